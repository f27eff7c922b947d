//! `AdminError`: what the admin API refuses for the operator's input. `error.rs` maps it to a
//! status and code, with every other error, in its one table.

use crate::gateway::{BindError, StartError};

/// An admin request refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin token is missing or wrong.
    #[error(
        "The admin token is missing or wrong: send `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN` \
         with the token the gateway was started with."
    )]
    Unauthorized,
    /// The gateway was started without an admin token: no token opens the admin API.
    #[error(
        "This gateway has no admin token, so its admin API is closed: start it with \
         TOLLGATE_ADMIN_TOKEN set."
    )]
    Closed,
    /// No such tenant.
    #[error("No tenant is named `{tenant}`.")]
    UnknownTenant {
        /// The name asked for.
        tenant: String,
    },
    /// The admin API may not change a channel of the configuration file.
    #[error("The channel `{name}` is defined in the configuration file; change it there.")]
    ConfigChannel {
        /// The channel.
        name: String,
    },
    /// No API channel has that name.
    #[error("No channel created through the API is named `{name}`.")]
    UnknownChannel {
        /// The name asked for.
        name: String,
    },
    /// The channel set could not be rebuilt after a change.
    #[error("the channels could not be reloaded")]
    ChannelReload(#[source] Box<StartError>),
    /// No such key.
    #[error("No key has the id `{key_id}`.")]
    UnknownKey {
        /// The id asked for.
        key_id: String,
    },
    /// No record of that request id.
    #[error("No request with id `{request_id}` is recorded.")]
    UnknownRequest {
        /// The id asked for.
        request_id: String,
    },
    /// A plugin or binding change was refused.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// An uploaded plugin is larger than the gateway accepts.
    #[error(
        "The plugin is larger than the {max_bytes} bytes this gateway accepts (`plugins.max_upload_mib`)."
    )]
    PluginTooLarge {
        /// The cap.
        max_bytes: usize,
    },
}
