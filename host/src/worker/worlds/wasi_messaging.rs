//! The WASI messaging draft (`wasi:messaging@0.2.0-draft`, world `messaging-core`): a
//! component that exports `incoming-handler` gets every message of its subscriptions as a
//! `message` resource, and sends through `producer.send` on a `client`.
//!
//! Mapping:
//! - in: the channel is the message's `topic`, the payload its `data`; the matched pattern,
//!   a stream entry's id and its fields go into `metadata` (`switchyard.pattern`,
//!   `switchyard.entry-id`, `switchyard.field.NAME` for fields that are UTF-8);
//! - out: `client.connect(name)` opens the host's own Redis for `default` (the only name);
//!   `producer.send(client, topic, message)` is a `send` of the message's data on the channel
//!   `topic`, under the plugin's publish grants, loop guard and limits. The content type and
//!   metadata of an outgoing message are not carried: pub/sub has no headers.

use wasmtime::component::Resource;

use super::super::state::HostState;
use crate::worker::bindings::switchyard::plugin::types::Error as HostError;

/// Generated from `wit/hosts/wasi-messaging`.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "wasi:messaging/messaging-core",
        path: "../wit/hosts/wasi-messaging",
        imports: { default: trappable },
        with: {
            "wasi:messaging/types.message": super::MessageData,
            "wasi:messaging/types.client": super::ClientData,
        },
    });
}

pub use generated::exports::wasi::messaging::incoming_handler::Error as HandlerError;
use generated::wasi;
use generated::wasi::messaging::types::{Error, Metadata, Topic};
pub use generated::{MessagingCore, MessagingCorePre};

/// The metadata key of the pattern that matched the channel.
pub const PATTERN_KEY: &str = "switchyard.pattern";
/// The metadata key of a stream entry's id.
pub const ENTRY_ID_KEY: &str = "switchyard.entry-id";
/// The prefix of a stream entry's fields in the metadata.
pub const FIELD_PREFIX: &str = "switchyard.field.";

/// The name under which `client.connect` opens the host's own Redis.
pub const DEFAULT_CLIENT: &str = "default";

/// A message as the component sees it.
#[derive(Debug, Default, Clone)]
pub struct MessageData {
    /// The channel it arrived on; none for a message the component made.
    pub topic: Option<String>,
    /// The format of `data`, when known.
    pub content_type: Option<String>,
    /// The payload.
    pub data: Vec<u8>,
    /// Pairs carried beside the payload.
    pub metadata: Option<Metadata>,
}

impl MessageData {
    /// What the message holds in the host: its bytes and a fixed overhead.
    fn cost(&self) -> usize {
        let text = |t: &Option<String>| t.as_ref().map_or(0, String::len);
        let metadata = self
            .metadata
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum::<usize>();
        RESOURCE_OVERHEAD
            + self.data.len()
            + text(&self.topic)
            + text(&self.content_type)
            + metadata
    }
}

/// What any resource costs in the host beyond its own bytes.
const RESOURCE_OVERHEAD: usize = 128;

/// An open client: for now always the host's own Redis.
#[derive(Debug)]
pub struct ClientData;

impl From<HostError> for Error {
    fn from(error: HostError) -> Self {
        match error {
            HostError::Denied(why) => Error::PermissionDenied(why),
            HostError::Unavailable(why) => Error::Connection(why),
            HostError::Invalid(why) | HostError::Failed(why) => Error::Other(why),
        }
    }
}

/// How a handler's error reads in logs, `/plugins` and dead letters.
pub fn render_error(error: &HandlerError) -> String {
    match error {
        HandlerError::Timeout => "timeout".to_owned(),
        HandlerError::Connection(why) => format!("connection: {why}"),
        HandlerError::PermissionDenied(why) => format!("permission denied: {why}"),
        HandlerError::Other(why) => why.clone(),
    }
}

impl HostState {
    fn message(&self, message: &Resource<MessageData>) -> wasmtime::Result<&MessageData> {
        Ok(self.table().get(message)?)
    }

    fn message_mut(
        &mut self,
        message: &Resource<MessageData>,
    ) -> wasmtime::Result<&mut MessageData> {
        Ok(self.table_mut().get_mut(message)?)
    }

    /// Puts `message` in the store's table (counted against the plugin's memory cap).
    pub fn push_message(
        &mut self,
        message: MessageData,
    ) -> wasmtime::Result<Resource<MessageData>> {
        self.hold(message.cost())?;
        Ok(self.table_mut().push(message)?)
    }

    /// Takes `message` out of the store's table.
    fn take_message(&mut self, message: Resource<MessageData>) -> wasmtime::Result<MessageData> {
        let message = self.table_mut().delete(message)?;
        self.release(message.cost());
        Ok(message)
    }

    /// Changes `message` by `change`, counting what it then holds.
    fn change_message(
        &mut self,
        message: &Resource<MessageData>,
        change: impl FnOnce(&mut MessageData),
    ) -> wasmtime::Result<()> {
        let mut changed = self.message(message)?.clone();
        change(&mut changed);
        let (before, after) = (self.message(message)?.cost(), changed.cost());
        self.release(before);
        if let Err(error) = self.hold(after) {
            self.hold(before)?;
            return Err(error);
        }
        *self.message_mut(message)? = changed;
        Ok(())
    }
}

impl wasi::messaging::types::Host for HostState {}

impl wasi::messaging::types::HostClient for HostState {
    fn connect(&mut self, name: String) -> wasmtime::Result<Result<Resource<ClientData>, Error>> {
        if name != DEFAULT_CLIENT {
            return Ok(Err(Error::Connection(format!(
                "no messaging client named {} (the host's own Redis is {DEFAULT_CLIENT:?})",
                crate::text::quoted(&name)
            ))));
        }
        self.hold(RESOURCE_OVERHEAD)?;
        Ok(Ok(self.table_mut().push(ClientData)?))
    }

    fn disconnect(&mut self, _client: Resource<ClientData>) -> wasmtime::Result<Result<(), Error>> {
        Ok(Ok(()))
    }

    fn drop(&mut self, client: Resource<ClientData>) -> wasmtime::Result<()> {
        self.table_mut().delete(client)?;
        self.release(RESOURCE_OVERHEAD);
        Ok(())
    }
}

impl wasi::messaging::types::HostMessage for HostState {
    fn new(&mut self, data: Vec<u8>) -> wasmtime::Result<Resource<MessageData>> {
        self.push_message(MessageData {
            data,
            ..MessageData::default()
        })
    }

    fn topic(&mut self, message: Resource<MessageData>) -> wasmtime::Result<Option<Topic>> {
        Ok(self.message(&message)?.topic.clone())
    }

    fn content_type(&mut self, message: Resource<MessageData>) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.content_type.clone())
    }

    fn set_content_type(
        &mut self,
        message: Resource<MessageData>,
        content_type: String,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.content_type = Some(content_type))
    }

    fn data(&mut self, message: Resource<MessageData>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.message(&message)?.data.clone())
    }

    fn set_data(&mut self, message: Resource<MessageData>, data: Vec<u8>) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.data = data)
    }

    fn metadata(&mut self, message: Resource<MessageData>) -> wasmtime::Result<Option<Metadata>> {
        Ok(self.message(&message)?.metadata.clone())
    }

    fn add_metadata(
        &mut self,
        message: Resource<MessageData>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| {
            let metadata = m.metadata.get_or_insert_default();
            match metadata.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => *v = value,
                None => metadata.push((key, value)),
            }
        })
    }

    fn set_metadata(
        &mut self,
        message: Resource<MessageData>,
        meta: Metadata,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.metadata = Some(meta))
    }

    fn remove_metadata(
        &mut self,
        message: Resource<MessageData>,
        key: String,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| {
            if let Some(metadata) = &mut m.metadata {
                metadata.retain(|(k, _)| *k != key);
            }
        })
    }

    fn drop(&mut self, message: Resource<MessageData>) -> wasmtime::Result<()> {
        self.take_message(message)?;
        Ok(())
    }
}

impl wasi::messaging::producer::Host for HostState {
    fn send(
        &mut self,
        client: Resource<ClientData>,
        topic: Topic,
        message: Resource<MessageData>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.table().get(&client)?;
        let data = self.take_message(message)?.data;
        Ok(
            crate::worker::bindings::switchyard::plugin::host::Host::send(self, topic, data)
                .map_err(Error::from),
        )
    }
}
