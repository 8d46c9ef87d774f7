//! The C ABI (`include/compresskv.h`).
//!
//! TODO(helper C).
