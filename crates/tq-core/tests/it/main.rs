//! tq-core integration tests (one binary). Statistical tolerances are derived
//! from the measured standard error (`Z` standard errors) or stated by the issue.

mod baselines;
mod codecs;
mod fastscan;
mod fingerprint;
mod kernels;
mod limits;
mod theory;
