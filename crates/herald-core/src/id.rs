//! Prefixed, sortable identifiers (`ntf_…`, `dlv_…`, `dev_…`, `key_…`).
//!
//! The body is a ULID in Crockford base32, so ids sort by creation time and
//! a mistyped id of the wrong kind is rejected by its prefix alone.
//!
//! A delivery's id follows its notification's ([`DeliveryId::of`]): the
//! same ULID with the last digit naming the channel, so Postgres finds a
//! notification's deliveries by primary key (migration `…080`).

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

/// Every id's prefix is this long (`ntf_`, `dlv_`, …).
const PREFIX_LEN: usize = 4;

/// Room for an id's text form: the prefix and a ULID's 26 digits.
#[derive(Default)]
pub struct IdText([u8; PREFIX_LEN + ulid::ULID_LEN]);

fn text<'b>(buf: &'b mut [u8; PREFIX_LEN + ulid::ULID_LEN], prefix: &str, id: Ulid) -> &'b str {
    let (head, body) = buf.split_at_mut(PREFIX_LEN);
    head.copy_from_slice(prefix.as_bytes());
    let mut digits = [0; ulid::ULID_LEN];
    body.copy_from_slice(id.array_to_str(&mut digits).as_bytes());
    // Infallible: the prefixes are ASCII literals and the digits base32.
    std::str::from_utf8(buf).expect("an id's text is ASCII")
}

macro_rules! prefixed_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        prefixed_id!($(#[$meta])* $name, $prefix, $kind, 0);
    };
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $kind:literal, $reserved:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ulid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            /// Low bits that [`generate`](Self::generate) leaves zero.
            const RESERVED_BITS: u128 = $reserved;

            /// A new id, unique and ordered by creation time.
            #[must_use]
            pub fn generate() -> Self {
                Self(Ulid(Ulid::new().0 & !Self::RESERVED_BITS))
            }

            #[must_use]
            pub fn ulid(&self) -> Ulid {
                self.0
            }
        }

        const _: () = assert!($prefix.len() == PREFIX_LEN);

        impl $name {
            /// The text form, written into `buf` (no allocation, no
            /// formatting machinery: ids are written into every answer,
            /// job and statement, so they skip it).
            pub fn text<'b>(&self, buf: &'b mut IdText) -> &'b str {
                text(&mut buf.0, $prefix, self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.text(&mut IdText::default()))
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
                s.serialize_str(self.text(&mut IdText::default()))
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
    /// One notification request: what to say, to whom. Generated with its
    /// last base32 digit 0, the room its deliveries' ids use.
    NotificationId, "ntf_", "notification", CHANNEL_DIGIT
);
prefixed_id!(
    /// One channel's delivery of a notification.
    DeliveryId, "dlv_", "delivery"
);

/// The last base32 digit of a ULID (its five lowest bits).
const CHANNEL_DIGIT: u128 = 0x1f;

impl DeliveryId {
    /// The id of `notification`'s delivery on `channel`: the notification's
    /// ULID with its last digit replaced by the channel's (1 email, 2 push,
    /// 3 in-app), as the database's `delivery_ids_of` derives it. Unique per
    /// notification and channel, and ordered like the notification.
    #[must_use]
    pub fn of(notification: NotificationId, channel: crate::Channel) -> Self {
        let digit: u128 = match channel {
            crate::Channel::Email => 1,
            crate::Channel::Push => 2,
            crate::Channel::InApp => 3,
        };
        Self(Ulid((notification.0.0 & !CHANNEL_DIGIT) | digit))
    }
}
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
    use crate::Channel;

    #[test]
    fn the_text_form_is_the_prefix_and_the_ulid() {
        for _ in 0..1000 {
            let id = NotificationId::generate();
            let expected = format!("ntf_{}", id.ulid());
            assert_eq!(id.to_string(), expected);
            assert_eq!(id.text(&mut IdText::default()), expected);
            assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{expected}\""));
            let d = DeliveryId::of(id, Channel::Push);
            assert_eq!(d.to_string(), format!("dlv_{}", d.ulid()));
        }
        assert_eq!(ApiKeyId::generate().to_string().len(), 30);
    }

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
    fn a_delivery_id_is_its_notification_id_with_the_channel_as_last_digit() {
        for _ in 0..100 {
            let ntf = NotificationId::generate();
            let text = ntf.to_string();
            assert!(text.ends_with('0'), "{text}");
            for (channel, digit) in [(Channel::Email, '1'), (Channel::Push, '2'), (Channel::InApp, '3')] {
                let dlv = DeliveryId::of(ntf, channel).to_string();
                assert_eq!(dlv[4..29], text[4..29], "{dlv} of {text}");
                assert!(dlv.ends_with(digit), "{dlv}");
                assert_eq!(dlv.parse::<DeliveryId>().unwrap().to_string(), dlv);
            }
        }
        // Distinct notifications, distinct deliveries.
        let (a, b) = (NotificationId::generate(), NotificationId::generate());
        assert_ne!(DeliveryId::of(a, Channel::Email), DeliveryId::of(b, Channel::Email));
    }

    #[test]
    fn garbage_after_the_prefix_is_rejected() {
        assert!("dlv_not-a-ulid".parse::<DeliveryId>().is_err());
        assert!("dlv_".parse::<DeliveryId>().is_err());
    }
}
