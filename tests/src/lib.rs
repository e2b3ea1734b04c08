//! Support for infermesh's end-to-end tests.
#![forbid(unsafe_code)]
