//! The C ABI (`include/compresskv.h`).
//!
//! Every function of the header is implemented here as a `#[no_mangle] extern "C"` function. Rules, each
//! relied on by the C side:
//! - Nothing unwinds across the boundary: every body runs inside [`std::panic::catch_unwind`]; a panic
//!   becomes `CKV_ERR_PANIC` with its message.
//! - Every failure sets the thread-local last-error message (read by [`ckv_last_error`]), prefixed with the
//!   function's name, and returns the [`Error::status`](crate::Error::status) of the error. Successful calls
//!   leave it as it was.
//! - Every pointer is checked (NULL: `CKV_ERR_NULL`; misaligned: `CKV_ERR_INVALID_ARG`) and every enum
//!   arrives as a plain integer and is validated, so an out-of-range value from C is an error, never UB.
//! - Versioned structs (`ckv_params`) are read by their `size` field: only the fields that lie wholly inside
//!   `size` bytes are read, missing trailing fields take their defaults.
//! - A failing call writes nothing to the caller's buffers or out-pointers (the only exception is
//!   `*needed` of [`ckv_plan_stats_json`], which the header specifies).
//! - Handles carry a magic word, checked on every use: a best-effort guard against passing a freed or
//!   foreign pointer (it cannot make such use safe, only make it likely to be reported).
//!
//! The `#[repr(C)]` mirrors of the header's structs and the enum constants are public so that the header
//! test (`tests/header_bindgen.rs`) can compare them with the header's layout.
//!
//! Layout (one entry-point group per file; each file's doc states its invariants):
//! - `types`: the `#[repr(C)]` structs, enum values, version macros and the opaque handles;
//! - `boundary`: last error, the `catch_unwind` wrappers, the checked raw-pointer views;
//! - `params`: `ckv_params` (defaults, versioned read, validation), enum conversions, method names;
//! - `misc`: version, status names, fingerprints, row dequantization;
//! - `budget`: `ckv_budget_fit`, `ckv_budget_allocate`;
//! - `profile`: the `ckv_profile_*` entry points;
//! - `plan`: `ckv_plan_create`, the plan accessors and `ckv_plan_stats_json`;
//! - `compact`: `ckv_compact`, `ckv_checksum` and the caller-buffer geometry and views;
//! - `gather`: `ckv_plan_gather`, the index blocks of a device gather;
//! - `options`: `ckv_options_check`, `ckv_option_get`;
//! - `request`: `ckv_request_*`, the policy of one compression of a llama.cpp sequence.
//! - `request_plan`: `ckv_request_plan` and `ckv_request_plan_scored` (scores from the caller's scorer).

#![allow(non_camel_case_types)]

mod boundary;
mod budget;
mod compact;
mod gather;
mod misc;
mod options;
mod params;
mod plan;
mod profile;
mod request;
mod request_plan;
mod types;

pub use boundary::ckv_last_error;
pub use budget::{ckv_budget_allocate, ckv_budget_fit};
pub use compact::{ckv_checksum, ckv_compact};
pub use gather::{ckv_gather_block, ckv_plan_gather};
pub use misc::{ckv_dequantize_row, ckv_fingerprint, ckv_status_name, ckv_version};
pub use options::{ckv_flag, ckv_flag_get, ckv_option_get, ckv_options_check, ckv_overflow, ckv_overflow_plan};
pub use params::{ckv_method_from_name, ckv_params_default, CKV_PARAMS_MIN_SIZE};
pub use plan::{
    ckv_plan_budget, ckv_plan_create, ckv_plan_fallback, ckv_plan_free, ckv_plan_group, ckv_plan_n_groups,
    ckv_plan_n_slots, ckv_plan_stats_json, plan_into_handle,
};
pub use profile::{ckv_profile_find, ckv_profile_free, ckv_profile_load, ckv_profile_parse};
pub use request::*;
pub use request_plan::{ckv_request_plan, ckv_request_plan_scored, ckv_score_fn};
pub use types::*;
