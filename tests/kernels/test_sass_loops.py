"""``sass.parse_sass`` finds loops as cycles of the control-flow graph, not as address ranges:
ptxas lays cold blocks out after a loop and branches back, and leaves loops with a
``CALL.REL.NOINC`` that never returns. Hand-written SASS in nvdisasm's format."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from boost_kernels.sass import parse_sass  # noqa: E402


def _sass(*lines: str) -> str:
    out, addr = [], 0
    for line in lines:
        if line.endswith(":"):
            out.append(line)
        else:
            out.append(f"        /*{addr:04x}*/                   {line} ;")
            addr += 0x10
    return "\n".join(out)


def _in_loop(sass: str) -> dict[str, bool]:
    return {f"{op} {rest.strip()}".strip(): loop for _, op, rest, loop in parse_sass(sass)}


def test_a_fence_on_a_cycle_is_in_a_loop():
    got = _in_loop(
        _sass(
            "MOV R1, RZ",
            ".L_x_0:",
            "MEMBAR.ALL.GPU",
            "HMMA.16816.F32 R4, R8, R12, R4",
            "ISETP.GE.AND P0, PT, R1, 0x10, PT",
            "@!P0 BRA `(.L_x_0)",
            "EXIT",
        )
    )
    assert got["MEMBAR.ALL.GPU"] and got["HMMA.16816.F32 R4, R8, R12, R4"]
    assert not got["MOV R1, RZ"] and not got["EXIT"]


def test_a_block_laid_out_after_a_loop_that_jumps_back_is_not_in_it():
    # if (p) { fence; } laid out at the end: the unconditional branch back is a backward branch,
    # but no cycle runs through the fence.
    got = _in_loop(
        _sass(
            "@P0 BRA `(.L_x_9)",
            ".L_x_1:",
            "STG.E [R2.64], R4",
            "EXIT",
            ".L_x_9:",
            "MEMBAR.ALL.GPU",
            "ATOMG.E.EXCH.STRONG.GPU PT, RZ, [R2.64], R5",
            "BRA `(.L_x_1)",
        )
    )
    assert not got["MEMBAR.ALL.GPU"] and not got["STG.E [R2.64], R4"]


def test_call_to_an_own_label_is_a_branch_and_helpers_inherit_their_call_site():
    got = _in_loop(
        _sass(
            ".L_x_0:",
            "HMMA.16816.F32 R4, R8, R12, R4",
            "CALL.REL.NOINC `($__internal_0_helper)",
            "@P0 CALL.REL.NOINC `(.L_x_5)",
            "BRA `(.L_x_0)",
            ".L_x_5:",
            "MEMBAR.ALL.GPU",
            "EXIT",
            "$__internal_0_helper:",
            "SHFL.BFLY PT, R13, R12, R15, R14",
            "RET.REL.NODEC R8 `(kernel)",
        )
    )
    assert got["HMMA.16816.F32 R4, R8, R12, R4"]
    assert not got["MEMBAR.ALL.GPU"]
    assert got["SHFL.BFLY PT, R13, R12, R15, R14"]  # called from inside the loop
