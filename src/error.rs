//! Errors and their C status codes.
//!
//! Invariant: every fallible public function returns [`Result`]; the [`Error`] variant maps one-to-one
//! onto a `ckv_status` code of the C header, and its `Display` text is the readable message that
//! `ckv_last_error()` returns.

use std::fmt;

/// Library error. The string is a complete, human-readable sentence fragment naming the bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A required pointer/argument was null or missing.
    Null(String),
    /// An argument is out of range or inconsistent with the others.
    InvalidArg(String),
    /// The element type is not supported for this operation.
    UnsupportedType(String),
    /// A buffer is too small for the declared geometry.
    Size(String),
    /// A profile could not be parsed or does not match the model.
    Profile(String),
    /// A file could not be read or written.
    Io(String),
    /// Memory for scratch or results could not be allocated.
    Alloc(String),
    /// An internal panic was caught (a bug: please report).
    Panic(String),
}

/// Library result.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The C status code (`ckv_status`) for this error. `0` is reserved for success.
    pub fn status(&self) -> i32 {
        match self {
            Error::Null(_) => 1,
            Error::InvalidArg(_) => 2,
            Error::UnsupportedType(_) => 3,
            Error::Size(_) => 4,
            Error::Profile(_) => 5,
            Error::Io(_) => 6,
            Error::Alloc(_) => 7,
            Error::Panic(_) => 8,
        }
    }

    /// The message without the category prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::Null(m)
            | Error::InvalidArg(m)
            | Error::UnsupportedType(m)
            | Error::Size(m)
            | Error::Profile(m)
            | Error::Io(m)
            | Error::Alloc(m)
            | Error::Panic(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Error::Null(_) => "null argument",
            Error::InvalidArg(_) => "invalid argument",
            Error::UnsupportedType(_) => "unsupported type",
            Error::Size(_) => "buffer size",
            Error::Profile(_) => "profile",
            Error::Io(_) => "i/o",
            Error::Alloc(_) => "allocation",
            Error::Panic(_) => "internal panic",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for Error {}

/// Shorthand: `Err(Error::InvalidArg(format!(..)))`.
#[macro_export]
macro_rules! invalid {
    ($($t:tt)*) => { Err($crate::error::Error::InvalidArg(format!($($t)*))) };
}
