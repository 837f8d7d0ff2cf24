//! Postgres encoding of the domain types (the `sqlx` feature): each is a
//! `TEXT` column holding its wire name or prefixed id, so rows and
//! parameters carry the types themselves. A value the database holds that
//! the type does not know is a decode error naming the value, never a
//! silent default.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

use crate::{
    ApiKeyId, Channel, DeliveryId, DeliveryStatus, DeviceId, DevicePlatform, ErrorClass, IdText, NotificationId,
    Priority, PurgeId, PushProvider, ReplayId,
};

macro_rules! text_column {
    ($name:ty, |$v:ident| $text:expr) => {
        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, out: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                let $v = self;
                <&str as Encode<Postgres>>::encode($text, out)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Postgres>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }

        // Lists bind as `TEXT[]`, like `Vec<String>`.
        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }
    };
}

macro_rules! names {
    ($($name:ty),+) => { $(text_column!($name, |v| v.as_str());)+ };
}

macro_rules! ids {
    ($($name:ty),+) => { $(text_column!($name, |v| v.text(&mut IdText::default()));)+ };
}

names!(
    Channel,
    Priority,
    DevicePlatform,
    PushProvider,
    DeliveryStatus,
    ErrorClass
);
ids!(NotificationId, DeliveryId, DeviceId, ApiKeyId, ReplayId, PurgeId);
