//! Integration tests live under `tests/integration`; this library is empty on purpose.
