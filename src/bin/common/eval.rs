//! The graph evaluation callback (`cb_eval` of `llama_context_params`) as a safe trait.
//!
//! During `llama_decode`, ggml's scheduler asks for each graph node whether the observer wants it
//! ([`Observer::wants`]); the nodes it wants are computed, then handed to [`Observer::observe`], which may
//! read and overwrite their data before the graph goes on. Returning false from `observe` stops the graph
//! (the decode fails). The callback runs on the thread that called `llama_decode`, between decodes the
//! observer is the caller's again (a `RefCell` borrowed only inside the callback).

use std::cell::RefCell;
use std::ffi::{c_void, CStr};
use std::marker::PhantomData;
use std::rc::Rc;

use super::sys;

/// What a context's evaluation callback does with the graph's nodes.
pub trait Observer {
    /// Whether the node `t` (its data not computed yet) is to be observed.
    fn wants(&mut self, t: &Tensor<'_>) -> bool;
    /// The node `t`, computed; false stops the graph computation.
    fn observe(&mut self, t: &mut Tensor<'_>) -> bool;
}

/// A graph node during the callback.
pub struct Tensor<'a> {
    ptr: *mut sys::ggml_tensor,
    _life: PhantomData<&'a mut sys::ggml_tensor>,
}

impl Tensor<'_> {
    fn node(&self) -> &sys::ggml_tensor {
        // SAFETY: the scheduler passes a valid node for the duration of the callback.
        unsafe { &*self.ptr }
    }

    /// The node's name (bytes before the NUL).
    pub fn name(&self) -> &[u8] {
        name_of(self.node())
    }

    /// Whether the node is a matrix multiplication.
    pub fn is_mul_mat(&self) -> bool {
        self.node().op == sys::ggml_op_GGML_OP_MUL_MAT
    }

    /// The name of the node's first source, if it has one.
    pub fn src0_name(&self) -> Option<&[u8]> {
        let s = self.node().src[0];
        // SAFETY: a non-null source of a valid node is a valid tensor for the callback's duration.
        (!s.is_null()).then(|| name_of(unsafe { &*s }))
    }

    /// Whether the data is contiguous f32.
    pub fn is_f32_contiguous(&self) -> bool {
        // SAFETY: a valid node.
        self.node().type_ == sys::ggml_type_GGML_TYPE_F32 && unsafe { sys::ggml_is_contiguous(self.ptr) }
    }

    /// The sizes `ne[0..4]`.
    pub fn ne(&self) -> [i64; 4] {
        self.node().ne
    }

    /// Elements.
    pub fn n_elements(&self) -> usize {
        // SAFETY: a valid node.
        unsafe { sys::ggml_nelements(self.ptr) as usize }
    }

    /// Copy the data (contiguous f32, [`Tensor::is_f32_contiguous`]) into `out`, resized to fit.
    pub fn read_f32(&self, out: &mut Vec<f32>) {
        assert!(self.is_f32_contiguous());
        let n = self.n_elements();
        out.resize(n, 0.0);
        // SAFETY: the node's computed data is n contiguous f32 values; `out` has room for them.
        unsafe { sys::ggml_backend_tensor_get(self.ptr, out.as_mut_ptr() as *mut c_void, 0, n * 4) }
    }

    /// Overwrite the data (contiguous f32) with `data`, which has exactly [`Tensor::n_elements`] values.
    pub fn write_f32(&mut self, data: &[f32]) {
        assert!(self.is_f32_contiguous() && data.len() == self.n_elements());
        // SAFETY: as in read_f32; the nodes after this one have not been computed yet.
        unsafe { sys::ggml_backend_tensor_set(self.ptr, data.as_ptr() as *const c_void, 0, data.len() * 4) }
    }
}

fn name_of(t: &sys::ggml_tensor) -> &[u8] {
    // SAFETY: ggml keeps `name` NUL-terminated within its array.
    unsafe { CStr::from_ptr(t.name.as_ptr()) }.to_bytes()
}

/// The user data pointer for [`trampoline`]: the address of `o` (an Rc in a box, so that it does not move).
pub(super) fn user_data(o: &Rc<RefCell<dyn Observer>>) -> *mut c_void {
    o as *const Rc<RefCell<dyn Observer>> as *mut c_void
}

/// The C callback: forwards to the observer that `user` points to ([`user_data`]).
pub(super) unsafe extern "C" fn trampoline(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: `user` is user_data() of a box the Context keeps alive until after llama_free; the scheduler
    // passes a valid node.
    let obs = unsafe { &*(user as *const Rc<RefCell<dyn Observer>>) };
    let mut tensor = Tensor {
        ptr: t,
        _life: PhantomData,
    };
    // Never borrowed across a decode by the tools: a failed borrow would be a bug, and stops the graph.
    let Ok(mut o) = obs.try_borrow_mut() else {
        return false;
    };
    if ask {
        o.wants(&tensor)
    } else {
        o.observe(&mut tensor)
    }
}
