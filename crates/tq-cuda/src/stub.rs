//! Built without the `cuda` feature: the same API, every entry point returns
//! [`Error::NoCuda`].

use crate::{AttnShape, Error, Result, SideKind, SideSpec};

enum Never {}

/// A CUDA device (never constructed in this build).
pub struct Gpu(Never);

/// A batch of KV caches on the device (never constructed in this build).
pub struct DeviceKv {
    pub shape: AttnShape,
    pub k: SideKind,
    pub v: SideKind,
    pub kernel: &'static str,
    never: Never,
}

impl Gpu {
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::NoCuda)
    }
    pub fn name(&self) -> Result<String> {
        match self.0 {}
    }
    pub fn sm_count(&self) -> usize {
        match self.0 {}
    }
    pub fn force_simt(&self, _on: bool) {
        match self.0 {}
    }
    pub fn force_splits(&self, _n: Option<usize>) {
        match self.0 {}
    }
    pub fn encode(&self, _side: &SideSpec, _xs: &[f32]) -> Result<Vec<u8>> {
        match self.0 {}
    }
    pub fn upload_kv(&self, _: &AttnShape, _: &SideSpec, _: &SideSpec, _: &[u8], _: &[u8]) -> Result<DeviceKv> {
        match self.0 {}
    }
    pub fn random_kv(&self, _: &AttnShape, _: &SideSpec, _: &SideSpec, _: usize, _: u32) -> Result<DeviceKv> {
        match self.0 {}
    }
    pub fn attend(&self, _kv: &mut DeviceKv, _q: &[f32]) -> Result<Vec<f32>> {
        match self.0 {}
    }
    pub fn time_attend(&self, _kv: &mut DeviceKv, _q: &[f32], _warmup: usize, _iters: usize) -> Result<f64> {
        match self.0 {}
    }
    pub fn copy_gbps(&self, _bytes: usize) -> Result<f64> {
        match self.0 {}
    }
}

impl DeviceKv {
    pub fn bytes_read(&self) -> usize {
        match self.never {}
    }
    pub fn splits(&self) -> usize {
        match self.never {}
    }
    pub fn occupancy(&self) -> Result<(i32, i32, u32)> {
        match self.never {}
    }
}
