//! Prefixed, sortable identifiers (`ntf_…`, `dlv_…`, `dev_…`, `key_…`).
//!
//! The body is a ULID in Crockford base32, so ids sort by creation time and
//! a mistyped id of the wrong kind is rejected by its prefix alone.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ulid::Ulid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {kind} id: expected `{prefix}` followed by 26 base32 characters")]
pub struct ParseIdError {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

macro_rules! prefixed_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ulid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new id, unique and ordered by creation time.
            #[must_use]
            pub fn generate() -> Self {
                Self(Ulid::new())
            }

            #[must_use]
            pub fn ulid(&self) -> Ulid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || ParseIdError { kind: $kind, prefix: $prefix, value: s.chars().take(64).collect() };
                let body = s.strip_prefix($prefix).ok_or_else(err)?;
                Ulid::from_string(body).map(Self).map_err(|_| err())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// One notification request: what to say, to whom.
    NotificationId, "ntf_", "notification"
);
prefixed_id!(
    /// One channel's delivery of a notification.
    DeliveryId, "dlv_", "delivery"
);
prefixed_id!(
    /// A registered push device of a user.
    DeviceId, "dev_", "device"
);
prefixed_id!(
    /// An API key (its public identifier, never the secret).
    ApiKeyId, "key_", "api key"
);
prefixed_id!(
    /// An operator's replay of failed or dead deliveries.
    ReplayId, "rpl_", "replay"
);
prefixed_id!(
    /// An operator's purge of old dead letters.
    PurgeId, "prg_", "purge"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_round_trips_through_its_text_form() {
        let id = DeliveryId::generate();
        let text = id.to_string();
        assert!(text.starts_with("dlv_"));
        assert_eq!(text.len(), 30);
        assert_eq!(text.parse::<DeliveryId>().unwrap(), id);
    }

    #[test]
    fn an_id_of_another_kind_is_rejected_by_its_prefix() {
        let ntf = NotificationId::generate().to_string();
        let err = ntf.parse::<DeliveryId>().unwrap_err();
        assert_eq!(err.prefix, "dlv_");
        assert!(err.to_string().contains("not a valid delivery id"));
    }

    #[test]
    fn garbage_after_the_prefix_is_rejected() {
        assert!("dlv_not-a-ulid".parse::<DeliveryId>().is_err());
        assert!("dlv_".parse::<DeliveryId>().is_err());
    }
}
