//! Python bindings (`llmflash._native`), one file per Python-visible concept. Only this folder
//! imports pyo3; the core (everything else under `rust/`) is plain Rust, usable from other Rust code.

use pyo3::prelude::*;

mod attend;
mod buffer;
mod cache;
mod decode;
mod errors;
mod faults;
mod gemv;
mod overflow;
mod planner;
mod profile;
mod quant;
mod reader;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<buffer::PyAlignedBuf>()?;
    m.add_class::<reader::PyReader>()?;
    m.add_class::<cache::PyNeuronCache>()?;
    m.add_class::<cache::PyAdmission>()?;
    m.add_class::<overflow::PyOverflowReader>()?;
    m.add_class::<planner::PyPlan>()?;
    m.add_class::<decode::PyQAttention>()?;
    m.add_class::<decode::PyQDecoder>()?;
    m.add_class::<profile::PyProfile>()?;
    m.add_function(wrap_pyfunction!(planner::plan, m)?)?;
    m.add_function(wrap_pyfunction!(cache::combine_crcs, m)?)?;
    m.add_function(wrap_pyfunction!(profile::measure_point, m)?)?;
    m.add_function(wrap_pyfunction!(profile::measure, m)?)?;
    m.add_function(wrap_pyfunction!(gemv::f16_rows_gemv, m)?)?;
    m.add_function(wrap_pyfunction!(gemv::f16_bundle_ffn, m)?)?;
    m.add_function(wrap_pyfunction!(gemv::f16_matvec, m)?)?;
    m.add_function(wrap_pyfunction!(quant::q_matvec, m)?)?;
    m.add_function(wrap_pyfunction!(quant::q_bundle_ffn, m)?)?;
    m.add_function(wrap_pyfunction!(quant::q_bundle_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::q_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::q_set_portable, m)?)?;
    m.add_function(wrap_pyfunction!(quant::q_simd, m)?)?;
    m.add_function(wrap_pyfunction!(attend::attend_one, m)?)?;
    m.add_function(wrap_pyfunction!(faults::inject_fault, m)?)?;
    m.add_function(wrap_pyfunction!(faults::clear_faults, m)?)?;
    m.add_function(wrap_pyfunction!(faults::faults_fired, m)?)?;
    m.add("ALIGN", crate::aligned::ALIGN)?;
    m.add("DEFAULT_CONCURRENCY", crate::reader::DEFAULT_CONCURRENCY)?;
    m.add("MAX_CONCURRENCY", crate::reader::MAX_CONCURRENCY)?;
    Ok(())
}
