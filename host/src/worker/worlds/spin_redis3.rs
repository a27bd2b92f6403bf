//! Spin's current Redis handlers (`spin:redis/inbound-redis@3.0.0`, as spin-sdk 7 builds
//! them): the component exports `handle-message(payload)` as a component-model `async func`,
//! and may await the outbound Redis connection and the variables of Spin 3.
//!
//! The mapping is Spin 2's (see [`super::spin_redis`]): the payload alone in; on a connection
//! to the host's own Redis, `publish` is the host's `send` and `del` its `invalidate`, every
//! other command is refused with an error naming it; `variables.get` reads the manifest's
//! `[config]`. Spin 3's types have the same cases as Spin 2's, and
//! convert one to one.
//!
//! What differs is how the calls run. An async export runs as a task of the store's
//! concurrent event loop ([`call`]), which only an engine with component-model async and
//! concurrency support can drive ([`super::super::engine::Runtime::engine_for`]); the
//! synchronous worlds keep an engine without it, which calls faster. The imports here finish
//! at once: each is the synchronous host call it maps to, run in the store's data.

use wasmtime::component::{Accessor, HasSelf, Resource};
use wasmtime::{Result, Store};

use super::super::state::HostState;
use super::spin_redis::{self, Connection, Payload};

/// Generated from `wit/hosts/spin-redis-3`.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "switchyard:spin-redis-3/redis-handler",
        path: "../wit/hosts/spin-redis-3",
        imports: { default: async | store | trappable },
        with: {
            "spin:redis/redis@3.0.0.connection": super::super::spin_redis::Connection,
        },
    });
}

use generated::spin::redis::redis::{
    Error, HostConnection, HostConnectionWithStore, RedisParameter, RedisResult,
};
use generated::spin::variables::variables::Error as VariableError;
pub use generated::{RedisHandler, RedisHandlerPre};

/// The imports' view of a store: its data, the plugin's [`HostState`].
type Imports = HasSelf<HostState>;

/// Calls the handler with `payload` in `store`, driving the store's event loop on this
/// thread until the call returns. The outer error is a trap; the inner one, the handler's
/// own error, rendered.
pub fn call(
    handler: &RedisHandler,
    store: &mut Store<HostState>,
    payload: Payload,
) -> Result<Result<(), String>> {
    let inbound = handler.spin_redis_inbound_redis();
    let answer =
        futures::executor::block_on(store.run_concurrent(async |accessor| {
            inbound.call_handle_message(accessor, payload).await
        }))??;
    Ok(answer.map_err(|error| match error {
        Error::Other(why) => why,
        Error::InvalidAddress => "invalid address".to_owned(),
        Error::TooManyConnections => "too many connections".to_owned(),
        Error::TypeError => "type error".to_owned(),
    }))
}

impl generated::spin::redis::redis::Host for HostState {}

impl HostConnection for HostState {}

impl<T> HostConnectionWithStore<T> for Imports {
    async fn drop(accessor: &Accessor<T, Self>, connection: Resource<Connection>) -> Result<()> {
        accessor.with(|mut access| spin_redis::close(access.get(), connection))
    }

    async fn open(
        accessor: &Accessor<T, Self>,
        address: String,
    ) -> Result<Result<Resource<Connection>, Error>> {
        Ok(accessor
            .with(|mut access| spin_redis::open(access.get(), &address))?
            .map_err(error))
    }

    async fn publish(
        accessor: &Accessor<T, Self>,
        connection: Resource<Connection>,
        channel: String,
        payload: Payload,
    ) -> Result<Result<(), Error>> {
        Ok(accessor
            .with(|mut access| spin_redis::publish(access.get(), &connection, channel, payload))?
            .map_err(error))
    }

    async fn get(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        _key: String,
    ) -> Result<Result<Option<Payload>, Error>> {
        Ok(Err(error(spin_redis::refused("get"))))
    }

    async fn set(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        _key: String,
        _value: Payload,
    ) -> Result<Result<(), Error>> {
        Ok(Err(error(spin_redis::refused("set"))))
    }

    async fn incr(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        _key: String,
    ) -> Result<Result<i64, Error>> {
        Ok(Err(error(spin_redis::refused("incr"))))
    }

    async fn del(
        accessor: &Accessor<T, Self>,
        connection: Resource<Connection>,
        keys: Vec<String>,
    ) -> Result<Result<u32, Error>> {
        Ok(accessor
            .with(|mut access| spin_redis::del(access.get(), &connection, keys))?
            .map_err(error))
    }

    async fn sadd(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        _key: String,
        _values: Vec<String>,
    ) -> Result<Result<u32, Error>> {
        Ok(Err(error(spin_redis::refused("sadd"))))
    }

    async fn smembers(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        _key: String,
    ) -> Result<Result<Vec<String>, Error>> {
        Ok(Err(error(spin_redis::refused("smembers"))))
    }

    async fn srem(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        _key: String,
        _values: Vec<String>,
    ) -> Result<Result<u32, Error>> {
        Ok(Err(error(spin_redis::refused("srem"))))
    }

    async fn execute(
        _: &Accessor<T, Self>,
        _: Resource<Connection>,
        command: String,
        _arguments: Vec<RedisParameter>,
    ) -> Result<Result<Vec<RedisResult>, Error>> {
        Ok(Err(error(spin_redis::refused(&format!(
            "execute {}",
            crate::text::quoted(&command)
        )))))
    }
}

impl generated::spin::variables::variables::Host for HostState {}

impl<T> generated::spin::variables::variables::HostWithStore<T> for Imports {
    async fn get(
        accessor: &Accessor<T, Self>,
        name: String,
    ) -> Result<Result<String, VariableError>> {
        Ok(accessor
            .with(|mut access| spin_redis::variable(access.get(), &name))
            .ok_or(VariableError::Undefined(name)))
    }
}

/// A Spin 2 error as Spin 3's, case for case.
fn error(error: spin_redis::Error) -> Error {
    match error {
        spin_redis::Error::InvalidAddress => Error::InvalidAddress,
        spin_redis::Error::TooManyConnections => Error::TooManyConnections,
        spin_redis::Error::TypeError => Error::TypeError,
        spin_redis::Error::Other(why) => Error::Other(why),
    }
}

/// Adds the world's imports to `linker`, which must belong to an engine with concurrency
/// support.
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<HostState>) -> Result<()> {
    RedisHandler::add_to_linker::<HostState, Imports>(linker, |state| state)
}
