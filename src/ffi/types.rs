//! The `#[repr(C)]` mirrors of the header's structs (`ckv_params`, `ckv_buffer`, `ckv_shape`,
//! `ckv_model_desc`), the values of its enums and version macros, and the two opaque handles.
//!
//! Invariants: every struct here has exactly the header's layout (checked by `tests/header_bindgen.rs`) and
//! `ckv_params` has no padding (asserted at compile time in [`super::params`]). A live handle carries its
//! magic word ([`PLAN_MAGIC`], [`PROFILE_MAGIC`]); freeing it clears the word, so a stale pointer is likely
//! reported instead of used. A [`ckv_plan`]'s `int32_t` group copies always equal its [`Plan`]'s groups.

use std::ffi::c_char;
use std::ffi::c_void;

use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::profile::Profile;

/// `ckv_status` (a C enum: passed as a plain `int`).
pub type ckv_status = i32;

/// Success.
pub const CKV_OK: ckv_status = 0;
/// A required pointer is NULL.
pub const CKV_ERR_NULL: ckv_status = 1;
/// A value is out of range or inconsistent.
pub const CKV_ERR_INVALID_ARG: ckv_status = 2;
/// Element type not supported for this operation.
pub const CKV_ERR_UNSUPPORTED_TYPE: ckv_status = 3;
/// A buffer is smaller than its declared geometry.
pub const CKV_ERR_SIZE: ckv_status = 4;
/// Profile unreadable or for another model.
pub const CKV_ERR_PROFILE: ckv_status = 5;
/// A file could not be read or written.
pub const CKV_ERR_IO: ckv_status = 6;
/// Out of memory.
pub const CKV_ERR_ALLOC: ckv_status = 7;
/// Internal error caught at the boundary.
pub const CKV_ERR_PANIC: ckv_status = 8;

/// `ckv_type`: ggml type ids.
pub const CKV_TYPE_F32: i32 = 0;
/// f16.
pub const CKV_TYPE_F16: i32 = 1;
/// q4_0.
pub const CKV_TYPE_Q4_0: i32 = 2;
/// q4_1.
pub const CKV_TYPE_Q4_1: i32 = 3;
/// q5_0.
pub const CKV_TYPE_Q5_0: i32 = 6;
/// q5_1.
pub const CKV_TYPE_Q5_1: i32 = 7;
/// q8_0.
pub const CKV_TYPE_Q8_0: i32 = 8;
/// iq4_nl.
pub const CKV_TYPE_IQ4_NL: i32 = 20;
/// bf16.
pub const CKV_TYPE_BF16: i32 = 30;

/// `ckv_method`: CompressKV.
pub const CKV_METHOD_COMPRESSKV: i32 = 0;
/// SnapKV.
pub const CKV_METHOD_SNAPKV: i32 = 1;
/// PyramidKV.
pub const CKV_METHOD_PYRAMIDKV: i32 = 2;
/// StreamingLLM.
pub const CKV_METHOD_STREAMINGLLM: i32 = 3;
/// SnapKV + SRH (ablation).
pub const CKV_METHOD_SNAPKV_SRH: i32 = 4;
/// The key gate (query-agnostic).
pub const CKV_METHOD_GATE: i32 = 5;

/// `ckv_pool`: average pooling.
pub const CKV_POOL_AVG: i32 = 0;
/// Max pooling.
pub const CKV_POOL_MAX: i32 = 1;

/// `ckv_alloc`: uniform budgets.
pub const CKV_ALLOC_UNIFORM: i32 = 0;
/// PyramidKV budgets.
pub const CKV_ALLOC_PYRAMID: i32 = 1;
/// Error-weighted budgets.
pub const CKV_ALLOC_WEIGHTED: i32 = 2;

/// `CKV_VERSION_MAJOR`.
pub const CKV_VERSION_MAJOR: u32 = 0;
/// `CKV_VERSION_MINOR`.
pub const CKV_VERSION_MINOR: u32 = 1;
/// `CKV_VERSION_PATCH`.
pub const CKV_VERSION_PATCH: u32 = 0;

/// Mirror of `ckv_params`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ckv_params {
    /// `sizeof(ckv_params)` of the caller.
    pub size: usize,
    /// `ckv_method`.
    pub method: i32,
    /// Average kept tokens per layer (0: use `ratio`).
    pub budget: i32,
    /// Fraction kept when `budget == 0`.
    pub ratio: f32,
    /// Observation window length.
    pub window: i32,
    /// Window end (exclusive), -1: prompt end.
    pub window_end: i32,
    /// Sink tokens.
    pub n_sink: i32,
    /// Pooling kernel.
    pub pool_kernel: i32,
    /// `ckv_pool`.
    pub pool: i32,
    /// Chunk size.
    pub chunk: i32,
    /// SRHs per layer.
    pub n_srh: i32,
    /// Per-KV-head selection (0/1).
    pub per_head: i32,
    /// Fill form (0/1).
    pub fill: i32,
    /// Weighted allocation floor.
    pub floor: i32,
    /// PyramidKV beta.
    pub pyramid_beta: f32,
    /// `ckv_pool`: how a token set's heads combine.
    pub head_reduce: i32,
}

/// Mirror of `ckv_buffer`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_buffer {
    /// Base of the buffer.
    pub data: *mut c_void,
    /// Bytes available from `data`.
    pub size: usize,
    /// `ckv_type` (the C field is named `type`).
    pub type_: i32,
    /// Elements per cell.
    pub n_embd: i32,
    /// Cells.
    pub n_cells: i32,
    /// 0: rows per cell; 1: rows per channel.
    pub transposed: i32,
    /// Bytes between rows; 0: packed.
    pub stride: usize,
}

/// Mirror of `ckv_shape`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ckv_shape {
    /// Layers.
    pub n_layer: i32,
    /// Query heads.
    pub n_head: i32,
    /// KV heads.
    pub n_head_kv: i32,
    /// Head dimension.
    pub head_dim: i32,
}

/// Mirror of `ckv_model_desc`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_model_desc {
    /// GGUF `general.architecture`.
    pub arch: *const c_char,
    /// Attention shape.
    pub shape: ckv_shape,
    /// `ckv_fingerprint()` of the canonical metadata.
    pub fingerprint: *const c_char,
}

pub(super) const PLAN_MAGIC: u64 = 0x636b_765f_706c_616e; // "ckv_plan"
pub(super) const PROFILE_MAGIC: u64 = 0x636b_765f_7072_6f66; // "ckv_prof"

/// Kept tokens and moves of one group, as the `int32_t` arrays [`ckv_plan_group`](super::ckv_plan_group) hands out.
#[derive(Debug, Clone)]
pub(super) struct GroupI32 {
    pub(super) kept: Vec<i32>,
    pub(super) src: Vec<i32>,
    pub(super) dst: Vec<i32>,
}

/// Opaque plan handle (`ckv_plan`): a [`Plan`] plus `int32_t` copies of its groups.
#[derive(Debug)]
pub struct ckv_plan {
    pub(super) magic: u64,
    pub(super) plan: Plan,
    pub(super) groups: Vec<Vec<GroupI32>>,
}

impl ckv_plan {
    /// Wrap a plan, copying its index lists to `int32_t`.
    pub fn new(plan: Plan) -> Result<ckv_plan> {
        let conv = |v: &[u32], what: &str| -> Result<Vec<i32>> {
            v.iter()
                .map(|&x| i32::try_from(x).map_err(|_| Error::InvalidArg(format!("{what} index {x} exceeds int32_t"))))
                .collect()
        };
        let mut groups = Vec::with_capacity(plan.layers.len());
        for lp in &plan.layers {
            let mut gs = Vec::with_capacity(lp.groups.len());
            for g in &lp.groups {
                gs.push(GroupI32 {
                    kept: conv(&g.kept, "token")?,
                    src: conv(&g.src, "cell")?,
                    dst: conv(&g.dst, "cell")?,
                });
            }
            groups.push(gs);
        }
        Ok(ckv_plan {
            magic: PLAN_MAGIC,
            plan,
            groups,
        })
    }

    /// The wrapped plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Opaque profile handle (`ckv_profile`).
#[derive(Debug)]
pub struct ckv_profile {
    pub(super) magic: u64,
    pub(super) profile: Profile,
}

impl ckv_profile {
    /// The wrapped profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }
}
