/// What long work reports as it goes. Implementations must be cheap: `advance` is called once
/// per chunk from the thread collecting results.
pub trait Progress: Send + Sync {
    /// A new phase of `total` bytes begins (a disk being backed up, restored or verified).
    fn start(&self, what: &str, total: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
    /// Something the user should know that is not an error (a wait, a fallback).
    fn message(&self, text: &str);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn message(&self, _: &str) {}
}
