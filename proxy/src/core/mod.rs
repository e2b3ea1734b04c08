//! The bottom layer: the vocabulary every other layer speaks, importing
//! nothing else of the crate. The body type and its helpers ([`body`]),
//! the error vocabulary with its own classification ([`error`]), what a
//! request carries in its extensions ([`context`]), header names and
//! header rules ([`headers`]), a request's path normalised ([`path`]) and
//! its host checked ([`authority`]), the model a request names
//! ([`model`]), the metrics registry every layer registers its
//! families in ([`metrics`]), which worker the code runs on
//! ([`worker`]) and a future polled only when woken ([`woken`]).

pub(crate) mod authority;
pub(crate) mod body;
pub(crate) mod context;
pub(crate) mod error;
pub(crate) mod headers;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod path;
pub(crate) mod trace;
pub(crate) mod woken;
pub(crate) mod worker;
