//! Views of one layer's K or V buffer, shaped as llama.cpp stores them.
//!
//! Two layouts (docs/design.md §2.2):
//! - [`Layout::Rows`]: one row per cell; row `c` starts at byte `c * row_stride` and holds `n_embd`
//!   elements (`n_head_kv * head_dim`, heads contiguous). K always, V with flash attention.
//! - [`Layout::Transposed`]: one row per channel; channel `j` starts at byte `j * chan_stride` and holds
//!   `n_cells` elements, element (cell `c`, channel `j`) at `j * chan_stride + c * elem_bytes`. V without
//!   flash attention. Only float types can be transposed (ggml requires flash attention for quantized V).
//!
//! Invariants, checked once by [`Geometry::validate`] and relied on by every accessor:
//! - `n_embd` is a whole number of blocks of `ty`; for `Rows`, `row_stride >= ty.row_bytes(n_embd)`;
//!   for `Transposed`, `ty` is a float type and `chan_stride >= n_cells * elem_bytes`.
//! - The buffer holds at least [`Geometry::min_bytes`] bytes, so every cell/channel access is in bounds.
//!
//! `unsafe` appears only in [`LayerView::from_raw`] / [`LayerViewMut::from_raw`], which turn a caller's
//! pointer into a slice.

use crate::error::{Error, Result};
use crate::types::{dequantize_row, GgmlType};

/// How cells and channels map to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One row per cell, `row_stride` bytes apart.
    Rows {
        /// Bytes between consecutive cells' rows.
        row_stride: usize,
    },
    /// One row per channel, `chan_stride` bytes apart (llama.cpp's V without flash attention).
    Transposed {
        /// Bytes between consecutive channels' rows.
        chan_stride: usize,
    },
}

/// The shape of one layer's K or V buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Element type.
    pub ty: GgmlType,
    /// Elements per cell (`n_head_kv * head_dim`).
    pub n_embd: usize,
    /// Number of cells (llama.cpp's `kv_size` of the stream).
    pub n_cells: usize,
    /// Byte layout.
    pub layout: Layout,
}

impl Geometry {
    /// Row-major geometry with a packed stride.
    pub fn rows(ty: GgmlType, n_embd: usize, n_cells: usize) -> Result<Geometry> {
        let row = ty.row_bytes(n_embd).ok_or_else(|| {
            Error::InvalidArg(format!(
                "n_embd {n_embd} is not a multiple of the {} block size {}",
                ty.name(),
                ty.block_elems()
            ))
        })?;
        let g = Geometry {
            ty,
            n_embd,
            n_cells,
            layout: Layout::Rows { row_stride: row },
        };
        g.validate()?;
        Ok(g)
    }

    /// Transposed geometry with a packed channel stride.
    pub fn transposed(ty: GgmlType, n_embd: usize, n_cells: usize) -> Result<Geometry> {
        let g = Geometry {
            ty,
            n_embd,
            n_cells,
            layout: Layout::Transposed {
                chan_stride: n_cells * ty.block_bytes(),
            },
        };
        g.validate()?;
        Ok(g)
    }

    /// Check the invariants of the module doc (except the buffer length).
    pub fn validate(&self) -> Result<()> {
        if self.n_embd == 0 || self.n_cells == 0 {
            return Err(Error::InvalidArg(format!(
                "empty geometry: n_embd {} n_cells {}",
                self.n_embd, self.n_cells
            )));
        }
        let row = self.ty.row_bytes(self.n_embd).ok_or_else(|| {
            Error::InvalidArg(format!(
                "n_embd {} is not a multiple of the {} block size {}",
                self.n_embd,
                self.ty.name(),
                self.ty.block_elems()
            ))
        })?;
        match self.layout {
            Layout::Rows { row_stride } => {
                if row_stride < row {
                    return Err(Error::InvalidArg(format!(
                        "row stride {row_stride} < row size {row} bytes"
                    )));
                }
            }
            Layout::Transposed { chan_stride } => {
                if self.ty.is_quantized() {
                    return Err(Error::UnsupportedType(format!(
                        "a transposed buffer must be f32, f16 or bf16, not {}",
                        self.ty.name()
                    )));
                }
                let need = self
                    .n_cells
                    .checked_mul(self.ty.block_bytes())
                    .ok_or_else(|| Error::Size("overflow".into()))?;
                if chan_stride < need {
                    return Err(Error::InvalidArg(format!(
                        "channel stride {chan_stride} < {need} bytes"
                    )));
                }
            }
        }
        self.min_bytes().map(|_| ())
    }

    /// Bytes of one cell's row (`Rows`) or element size (`Transposed`).
    pub fn cell_bytes(&self) -> usize {
        match self.layout {
            Layout::Rows { .. } => self.ty.row_bytes(self.n_embd).unwrap_or(0),
            Layout::Transposed { .. } => self.ty.block_bytes(),
        }
    }

    /// Smallest buffer that holds every cell.
    pub fn min_bytes(&self) -> Result<usize> {
        let ovf = || Error::Size(format!("geometry {self:?} overflows usize"));
        match self.layout {
            Layout::Rows { row_stride } => {
                let row = self.ty.row_bytes(self.n_embd).ok_or_else(ovf)?;
                (self.n_cells - 1)
                    .checked_mul(row_stride)
                    .and_then(|x| x.checked_add(row))
                    .ok_or_else(ovf)
            }
            Layout::Transposed { chan_stride } => (self.n_embd - 1)
                .checked_mul(chan_stride)
                .and_then(|x| x.checked_add(self.n_cells * self.ty.block_bytes()))
                .ok_or_else(ovf),
        }
    }
}

/// Read-only view of one layer's buffer.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    geom: Geometry,
    data: &'a [u8],
}

/// Mutable view of one layer's buffer.
#[derive(Debug)]
pub struct LayerViewMut<'a> {
    geom: Geometry,
    data: &'a mut [u8],
}

fn check_len(geom: &Geometry, len: usize) -> Result<()> {
    geom.validate()?;
    let need = geom.min_bytes()?;
    if len < need {
        return Err(Error::Size(format!(
            "buffer of {len} bytes is smaller than the {need} bytes its geometry needs ({} x {} {}, {:?})",
            geom.n_cells,
            geom.n_embd,
            geom.ty.name(),
            geom.layout
        )));
    }
    Ok(())
}

impl<'a> LayerView<'a> {
    /// View over `data`, validated against `geom`.
    pub fn new(geom: Geometry, data: &'a [u8]) -> Result<Self> {
        check_len(&geom, data.len())?;
        Ok(LayerView { geom, data })
    }

    /// View over a raw buffer.
    ///
    /// # Safety
    /// `ptr` must be non-null and valid for reads of `len` bytes for `'a`, and nothing may write to
    /// those bytes while the view lives.
    pub unsafe fn from_raw(geom: Geometry, ptr: *const u8, len: usize) -> Result<Self> {
        if ptr.is_null() {
            return Err(Error::Null("buffer pointer is null".into()));
        }
        // SAFETY: the caller guarantees `ptr` is valid for `len` bytes for 'a and unaliased by writers.
        let data = unsafe { std::slice::from_raw_parts(ptr, len) };
        Self::new(geom, data)
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// 64-bit FNV-1a of the bytes of `cells`, in order, continuing from `h`: each cell's row (`Rows`), or its
    /// element of every channel in channel order (`Transposed`). Compares compaction paths byte for byte.
    /// Panics on a cell out of range (callers validate once up front).
    pub fn fnv1a(&self, cells: &[usize], mut h: u64) -> u64 {
        let cb = self.geom.cell_bytes();
        let mut eat = |at: usize| {
            for &b in &self.data[at..at + cb] {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
        };
        for &c in cells {
            assert!(c < self.geom.n_cells, "cell {c} out of range");
            match self.geom.layout {
                Layout::Rows { row_stride } => eat(c * row_stride),
                Layout::Transposed { chan_stride } => (0..self.geom.n_embd).for_each(|e| eat(e * chan_stride + c * cb)),
            }
        }
        h
    }

    /// Dequantize elements `[elem0, elem0 + out.len())` of cell `cell` into `out`.
    ///
    /// For `Rows`, `elem0` and `out.len()` must be multiples of the block size (a head slice with
    /// `head_dim % 32 == 0`). Panics on out-of-range arguments (callers validate once up front).
    pub fn dequantize(&self, cell: usize, elem0: usize, out: &mut [f32]) {
        assert!(cell < self.geom.n_cells && elem0 + out.len() <= self.geom.n_embd);
        match self.geom.layout {
            Layout::Rows { row_stride } => {
                let be = self.geom.ty.block_elems();
                assert!(elem0 % be == 0 && out.len() % be == 0, "slice not block aligned");
                let start = cell * row_stride + elem0 / be * self.geom.ty.block_bytes();
                let len = out.len() / be * self.geom.ty.block_bytes();
                dequantize_row(self.geom.ty, &self.data[start..start + len], out);
            }
            Layout::Transposed { chan_stride } => {
                let eb = self.geom.ty.block_bytes();
                for (j, o) in out.iter_mut().enumerate() {
                    let at = (elem0 + j) * chan_stride + cell * eb;
                    let mut one = [0f32];
                    dequantize_row(self.geom.ty, &self.data[at..at + eb], &mut one);
                    *o = one[0];
                }
            }
        }
    }
}

impl<'a> LayerViewMut<'a> {
    /// Mutable view over `data`, validated against `geom`.
    pub fn new(geom: Geometry, data: &'a mut [u8]) -> Result<Self> {
        check_len(&geom, data.len())?;
        Ok(LayerViewMut { geom, data })
    }

    /// Mutable view over a raw buffer.
    ///
    /// # Safety
    /// `ptr` must be non-null and valid for reads and writes of `len` bytes for `'a`, and no other
    /// reference to those bytes may be used while the view lives.
    pub unsafe fn from_raw(geom: Geometry, ptr: *mut u8, len: usize) -> Result<Self> {
        if ptr.is_null() {
            return Err(Error::Null("buffer pointer is null".into()));
        }
        // SAFETY: the caller guarantees exclusive access to `len` valid bytes at `ptr` for 'a.
        let data = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        Self::new(geom, data)
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// The raw bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.data
    }

    /// A read-only view of the same buffer.
    pub fn as_view(&self) -> LayerView<'_> {
        LayerView {
            geom: self.geom,
            data: self.data,
        }
    }
}
