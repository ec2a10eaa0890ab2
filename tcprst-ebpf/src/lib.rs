#![no_std]
// A library target so tcprst can declare a build-dependency on this crate and
// be rebuilt when it changes; the programs themselves are in the binary.
