//! Spin 2 Redis handlers (`fermyon:spin/inbound-redis`, as spin-sdk 3 builds them): the
//! component exports `handle-message(payload)` and may use the outbound Redis connection and
//! the variables of `fermyon:spin@2.0.0`.
//!
//! Mapping:
//! - in: the payload alone (the world has no channel);
//! - out, on a `connection` opened with the address of the host's own Redis (any other
//!   address is an `invalid-address` error): `publish` is the host's `send`, `del` its
//!   `invalidate`, each under the plugin's grants, loop guard and limits; every other command
//!   is refused with an error naming it;
//! - `variables.get(name)` reads the manifest's `[config]`, as `config` does for
//!   Switchyard plugins (`undefined` when it is not set).

use wasmtime::component::Resource;

use super::super::state::HostState;
use crate::worker::bindings::switchyard::plugin::host::Host as SwitchyardHost;
use crate::worker::bindings::switchyard::plugin::types::Error as HostError;
use crate::worker::host::render_error;

/// Generated from `wit/hosts/spin-redis-2`.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "switchyard:spin-redis-2/redis-handler",
        path: "../wit/hosts/spin-redis-2",
        imports: { default: trappable },
        with: {
            "fermyon:spin/redis@2.0.0.connection": super::Connection,
        },
    });
}

pub use generated::fermyon::spin2_0_0::redis::{Error, Payload, RedisParameter, RedisResult};
use generated::fermyon::spin2_0_0::variables::Error as VariableError;
pub use generated::{RedisHandler, RedisHandlerPre};

/// What an open connection counts against the plugin's memory cap.
const CONNECTION_COST: usize = 128;

/// An open connection: always the host's own Redis.
#[derive(Debug)]
pub struct Connection;

/// How a host error reads to a Spin component: as it reads in the host's logs.
fn spin_error(error: HostError) -> Error {
    Error::Other(render_error(&error))
}

/// The refusal of a command plugins may not run.
pub(super) fn refused(command: &str) -> Error {
    Error::Other(format!(
        "{command} is not available to plugins: publish (with a publish grant) and del (with \
         an invalidate grant) are"
    ))
}

/// Opens a connection for `connection.open(address)`: only to the host's own Redis.
pub(super) fn open(
    state: &mut HostState,
    address: &str,
) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
    if !state.plugin.effects.is_own_redis(address) {
        return Ok(Err(Error::InvalidAddress));
    }
    state.hold(CONNECTION_COST)?;
    Ok(Ok(state.table_mut().push(Connection)?))
}

/// `connection.publish`: the host's `send`, under the plugin's publish grants.
pub(super) fn publish(
    state: &mut HostState,
    connection: &Resource<Connection>,
    channel: String,
    payload: Payload,
) -> wasmtime::Result<Result<(), Error>> {
    state.table().get(connection)?;
    Ok(SwitchyardHost::send(state, channel, payload).map_err(spin_error))
}

/// `connection.del`: the host's `invalidate`, under the plugin's invalidate grants.
pub(super) fn del(
    state: &mut HostState,
    connection: &Resource<Connection>,
    keys: Vec<String>,
) -> wasmtime::Result<Result<u32, Error>> {
    state.table().get(connection)?;
    Ok(SwitchyardHost::invalidate(state, keys).map_err(spin_error))
}

/// Drops a connection the component no longer holds.
pub(super) fn close(
    state: &mut HostState,
    connection: Resource<Connection>,
) -> wasmtime::Result<()> {
    state.table_mut().delete(connection)?;
    state.release(CONNECTION_COST);
    Ok(())
}

/// `variables.get(name)`: the manifest's `[config]` value (`undefined` when it has none).
pub(super) fn variable(state: &mut HostState, name: &str) -> Option<String> {
    SwitchyardHost::config(state, name.to_owned())
}

impl generated::fermyon::spin::redis_types::Host for HostState {}

impl generated::fermyon::spin2_0_0::redis::Host for HostState {}

impl generated::fermyon::spin2_0_0::redis::HostConnection for HostState {
    fn open(&mut self, address: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        open(self, &address)
    }

    fn publish(
        &mut self,
        connection: Resource<Connection>,
        channel: String,
        payload: Payload,
    ) -> wasmtime::Result<Result<(), Error>> {
        publish(self, &connection, channel, payload)
    }

    fn get(
        &mut self,
        _: Resource<Connection>,
        _key: String,
    ) -> wasmtime::Result<Result<Option<Payload>, Error>> {
        Ok(Err(refused("get")))
    }

    fn set(
        &mut self,
        _: Resource<Connection>,
        _key: String,
        _value: Payload,
    ) -> wasmtime::Result<Result<(), Error>> {
        Ok(Err(refused("set")))
    }

    fn incr(
        &mut self,
        _: Resource<Connection>,
        _key: String,
    ) -> wasmtime::Result<Result<i64, Error>> {
        Ok(Err(refused("incr")))
    }

    fn del(
        &mut self,
        connection: Resource<Connection>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<u32, Error>> {
        del(self, &connection, keys)
    }

    fn sadd(
        &mut self,
        _: Resource<Connection>,
        _key: String,
        _values: Vec<String>,
    ) -> wasmtime::Result<Result<u32, Error>> {
        Ok(Err(refused("sadd")))
    }

    fn smembers(
        &mut self,
        _: Resource<Connection>,
        _key: String,
    ) -> wasmtime::Result<Result<Vec<String>, Error>> {
        Ok(Err(refused("smembers")))
    }

    fn srem(
        &mut self,
        _: Resource<Connection>,
        _key: String,
        _values: Vec<String>,
    ) -> wasmtime::Result<Result<u32, Error>> {
        Ok(Err(refused("srem")))
    }

    fn execute(
        &mut self,
        _: Resource<Connection>,
        command: String,
        _arguments: Vec<RedisParameter>,
    ) -> wasmtime::Result<Result<Vec<RedisResult>, Error>> {
        Ok(Err(refused(&format!(
            "execute {}",
            crate::text::quoted(&command)
        ))))
    }

    fn drop(&mut self, connection: Resource<Connection>) -> wasmtime::Result<()> {
        close(self, connection)
    }
}

impl generated::fermyon::spin2_0_0::variables::Host for HostState {
    fn get(&mut self, name: String) -> wasmtime::Result<Result<String, VariableError>> {
        Ok(variable(self, &name).ok_or(VariableError::Undefined(name)))
    }
}
