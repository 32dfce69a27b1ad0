//! The one place where core errors become Python exceptions, raised as `llmflash.errors`'
//! classes so `except llmflash.LlmflashError` catches everything:
//! Open/Read/Eof/Write -> FlashIOError (an OSError, with `errno` when the OS gave one),
//! Layout and Corrupt (a bundle's CRC-32 mismatch, with the path) -> StoreError,
//! Invalid/Profile -> InvalidArgumentError (also a ValueError), Alloc -> MemoryError.

use pyo3::exceptions::{PyMemoryError, PyOSError};
use pyo3::prelude::*;

use crate::error::Error;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| to_pyerr(py, &e))
    }
}

fn to_pyerr(py: Python<'_>, e: &Error) -> PyErr {
    let class = match e {
        Error::Open { .. } | Error::Read { .. } | Error::Eof { .. } | Error::Write { .. } => "FlashIOError",
        Error::Layout { .. } | Error::Corrupt { .. } => "StoreError",
        Error::Invalid { .. } | Error::Profile { .. } => "InvalidArgumentError",
        Error::Alloc { .. } => return PyMemoryError::new_err(e.to_string()),
    };
    let raise = || -> PyResult<PyErr> {
        let cls = py.import("llmflash.errors")?.getattr(class)?;
        let exc = cls.call1((e.message(), e.path()))?;
        if let Some(n) = e.errno() {
            exc.setattr("errno", n)?;
        }
        Ok(PyErr::from_value(exc))
    };
    // If llmflash.errors itself cannot be imported, still raise something that says what failed.
    raise().unwrap_or_else(|_| PyOSError::new_err(e.to_string()))
}
