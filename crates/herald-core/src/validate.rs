//! Validated newtypes for what callers send. Each `parse` returns a message
//! that tells the caller what to fix; the API turns it into a 422.

use std::fmt;

use serde::Serialize;

/// Upper bounds on caller-supplied text, in characters.
pub const MAX_TITLE_CHARS: usize = 256;
pub const MAX_BODY_CHARS: usize = 4_096;
pub const MAX_USER_ID_CHARS: usize = 128;
pub const MAX_CATEGORY_CHARS: usize = 64;
pub const MAX_TOKEN_CHARS: usize = 4_096;
pub const MAX_EMAIL_CHARS: usize = 254;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

impl InvalidField {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The product's own identifier of a user. Opaque to Herald, but bounded
/// and printable so it can appear in URLs, logs and headers safely.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, InvalidField> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@');
        if s.is_empty() {
            return Err(InvalidField::new("user_id", "must not be empty"));
        }
        if s.chars().count() > MAX_USER_ID_CHARS {
            return Err(InvalidField::new(
                "user_id",
                format!("must be at most {MAX_USER_ID_CHARS} characters"),
            ));
        }
        if !s.chars().all(ok_char) {
            return Err(InvalidField::new(
                "user_id",
                "may contain only letters, digits and _ - . : @",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An email address, syntactically checked and free of anything that could
/// smuggle a header (CR, LF, other control characters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, InvalidField> {
        let field = "email";
        let s = s.trim();
        if s.is_empty() || s.len() > MAX_EMAIL_CHARS {
            return Err(InvalidField::new(
                field,
                format!("must be an address of 3 to {MAX_EMAIL_CHARS} characters, like ada@example.com"),
            ));
        }
        if has_control(s) || s.contains(char::is_whitespace) {
            return Err(InvalidField::new(
                field,
                "must not contain spaces or control characters",
            ));
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return Err(InvalidField::new(field, "must contain an @, like ada@example.com"));
        };
        let bad_local = local.is_empty() || local.contains('@') || local.contains(['<', '>', '"', ',', ';']);
        let bad_domain = domain.is_empty()
            || domain.starts_with(['.', '-'])
            || domain.ends_with(['.', '-'])
            || !domain.contains('.')
            || !domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-');
        if bad_local || bad_domain {
            return Err(InvalidField::new(field, format!("`{s}` is not a valid email address")));
        }
        Ok(Self(s.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `a***@example.com`: enough to recognise in a log, not enough to harvest.
    #[must_use]
    pub fn masked(&self) -> String {
        mask_email(&self.0)
    }
}

/// Masks the local part of an address for logs.
#[must_use]
pub fn mask_email(s: &str) -> String {
    match s.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// A notification category (`alert`, `billing.invoice`, …): used for
/// preferences and filtering, so it is a short, stable slug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Category(String);

impl Category {
    pub fn parse(s: &str) -> Result<Self, InvalidField> {
        let ok = !s.is_empty()
            && s.len() <= MAX_CATEGORY_CHARS
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidField::new(
                "category",
                format!(
                    "must be 1 to {MAX_CATEGORY_CHARS} characters of a-z, 0-9, _ - . (for example `order.shipped`)"
                ),
            ))
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Category {
    fn default() -> Self {
        Self("general".to_owned())
    }
}

/// Checks a free-text field: bounded, and no control characters other than
/// newlines and tabs (in bodies).
pub fn check_text(field: &'static str, s: &str, max_chars: usize, multiline: bool) -> Result<(), InvalidField> {
    if s.chars().count() > max_chars {
        return Err(InvalidField::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    let bad = s
        .chars()
        .any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\r' | '\t')));
    if bad {
        let allowed = if multiline { " other than newlines and tabs" } else { "" };
        return Err(InvalidField::new(
            field,
            format!("must not contain control characters{allowed}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_with_a_header_injection_is_rejected() {
        assert!(EmailAddress::parse("ada@example.com\r\nBcc: eve@evil.test").is_err());
        assert!(EmailAddress::parse("ada@example.com").is_ok());
        assert!(EmailAddress::parse("ada").is_err());
        assert!(EmailAddress::parse("ada@localhost").is_err());
        assert!(EmailAddress::parse("<ada>@example.com").is_err());
    }

    #[test]
    fn masking_keeps_the_domain_only() {
        assert_eq!(mask_email("ada@example.com"), "a***@example.com");
    }

    #[test]
    fn user_ids_are_printable_and_bounded() {
        assert!(UserId::parse("u_42").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("u 42").is_err());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn categories_are_slugs() {
        assert!(Category::parse("order.shipped").is_ok());
        assert!(Category::parse("Order Shipped").is_err());
    }

    #[test]
    fn titles_refuse_control_characters_bodies_allow_newlines() {
        assert!(check_text("title", "a\nb", 10, false).is_err());
        assert!(check_text("body", "a\nb", 10, true).is_ok());
        assert!(check_text("body", "a\u{7}b", 10, true).is_err());
    }
}
