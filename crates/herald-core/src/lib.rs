//! Herald's domain types. Nothing here does I/O: every other crate parses
//! outside input into these types at its edge and passes them inward.

pub mod channel;
pub mod id;
pub mod outcome;
#[cfg(feature = "sqlx")]
mod sql;
pub mod status;
pub mod validate;

pub use channel::{Channel, DevicePlatform, Priority, PushProvider, UnknownValue};
pub use id::{ApiKeyId, DeliveryId, DeviceId, IdText, NotificationId, ParseIdError, PurgeId, ReplayId};
pub use outcome::{ErrorClass, OutcomeClass};
pub use status::DeliveryStatus;
pub use validate::{Category, EmailAddress, InvalidField, UserId};
