"""The method registries (optforge.methods) and the recipe schema derived from them: pure, no torch."""

from __future__ import annotations

import typing

from optforge.methods.compile import COMPILE_MODES, mode_names
from optforge.methods.quantize import QUANT_METHODS, get_method
from optforge.recipe import KEY_COMPAT, CompileMode, ConfigSpec, QuantizeParams, QuantizeSpec, QuantMethod


def test_the_recipe_offers_exactly_the_registered_methods_and_modes():
    assert set(typing.get_args(QuantMethod)) == set(QUANT_METHODS)
    assert set(typing.get_args(CompileMode)) == set(mode_names()) == {"none", *COMPILE_MODES}
    assert set(QuantizeSpec.model_fields) == {"name", "method", "group_size"}  # the union of the methods' params


def test_a_quantize_entry_takes_only_its_methods_parameters_and_dumps_round_trip():
    int4 = QuantizeSpec(name="q4", method="int4-weight-only")
    assert int4.model_dump() == {"name": "q4", "method": "int4-weight-only", "group_size": 128}
    dyn = QuantizeSpec(name="d", method="int8-dynamic")
    assert dyn.model_dump() == {"name": "d", "method": "int8-dynamic"}
    for spec in (int4, dyn):
        assert QuantizeSpec.model_validate(spec.model_dump()).model_dump() == spec.model_dump()


def test_stage_parameters_keep_the_keys_of_existing_caches():
    """Every quantize stage has always keyed on group_size (default 128); a method without it still does."""
    dyn = QuantizeSpec(name="d", method="int8-dynamic")
    assert QuantizeParams.for_step(dyn, "bf16") == {"method": "int8-dynamic", "group_size": 128, "precision": "bf16"}
    assert dyn.model_dump(context=KEY_COMPAT) == {"name": "d", "method": "int8-dynamic", "group_size": 128}
    int4 = QuantizeSpec(name="q4", method="int4-weight-only", group_size=64)
    assert QuantizeParams.for_step(int4, "fp32") == {"method": "int4-weight-only", "group_size": 64,
                                                     "precision": "fp32"}
    assert QuantizeParams.model_validate(QuantizeParams.for_step(int4, "fp32")).method_params().group_size == 64


def test_method_declarations():
    assert get_method("torch-int8-dynamic").compute_precision_for("fp32") == "int8"
    assert get_method("torch-fp16-dynamic").compute_precision_for("fp32") == "fp32"
    assert get_method("float8").compute_precision_for("bf16") == "fp8"
    assert get_method("int8-weight-only").compute_precision_for("bf16") == "bf16"
    assert {m.format for m in QUANT_METHODS.values()} == {"torchao", "torch-int8-dynamic"}
    assert [n for n, m in QUANT_METHODS.items() if m.params.model_fields] == ["int4-weight-only"]


def test_compile_modes_resolve_per_device():
    ro = COMPILE_MODES["reduce-overhead"]
    assert ro.resolve("cuda") == (COMPILE_MODES["default"], None)
    assert ro.resolve("cpu") == (COMPILE_MODES["default"], "reduce-overhead is CUDA graphs; on cpu compiled as default")
    assert COMPILE_MODES["max-autotune"].resolve("cpu") == (COMPILE_MODES["max-autotune"], None)
    assert ConfigSpec(name="c", compile="max-autotune").compile == "max-autotune"
