//! A string that must never be printed: tokens, client secrets, private keys, assertions,
//! refresh tokens.

use std::fmt;

/// A secret value. `Debug` prints `[redacted]`; there is no `Display`. Use
/// [`SecretString::expose`] at the one place the value goes on the wire or into a Secret.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Call sites are the audit list of where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = SecretString::new("s3cr3t-value");
        let printed = format!("{secret:?} {:?}", Some(&secret));
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert_eq!(secret.expose(), "s3cr3t-value");
    }
}
