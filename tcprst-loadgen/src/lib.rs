//! What tcprst's tests, `cargo xtask vm-test`, the bench and the soak share
//! on the test side: the reset scenarios with what each must produce, and
//! scratch network namespaces to make them in. The binary of this package
//! (`tcprst-loadgen`) is the load generator and the guest's scenario runner.

pub mod netns;
pub mod scenario;
