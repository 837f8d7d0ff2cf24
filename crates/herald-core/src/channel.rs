//! Channels, priorities and device kinds: the closed sets the API accepts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Declares a closed string enum with its wire names, `FromStr`/`Display`,
/// and an error that lists the accepted values (the API shows it to callers).
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        what: $what,
                        value: s.chars().take(64).collect(),
                        expected: &[$($wire),+],
                    }),
                }
            }
        }
    };
}

/// A value outside one of the closed sets, with the values that are accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`: expected one of {}", expected.join(", "))]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

wire_enum!(
    /// A way of reaching a user. Each channel has its own queues and worker.
    Channel, "channel" {
        Email => "email",
        Push => "push",
        InApp => "in_app",
    }
);

wire_enum!(
    /// How urgently a notification should go out. Workers serve higher
    /// priorities first, but never starve the lower ones.
    Priority, "priority" {
        High => "high",
        Normal => "normal",
        Low => "low",
    }
);

wire_enum!(
    /// The platform a device runs on.
    DevicePlatform, "platform" {
        Ios => "ios",
        Android => "android",
        Web => "web",
    }
);

wire_enum!(
    /// The push service a device token belongs to.
    PushProvider, "provider" {
        Fcm => "fcm",
        Apns => "apns",
        WebPush => "webpush",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>().unwrap(), *c);
        }
        for p in Priority::ALL {
            assert_eq!(p.as_str().parse::<Priority>().unwrap(), *p);
        }
    }

    #[test]
    fn an_unknown_value_lists_the_accepted_ones() {
        let err = "sms".parse::<Channel>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown channel `sms`: expected one of email, push, in_app"
        );
    }
}
