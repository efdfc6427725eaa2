"""What the compiler says about one kernel compiled for Hopper (sm_90a), read from its PTX, TTGIR and cubin.

Shared by sm90_aot.py (the expert path) and sm90_aot_attention.py (flash attention). Works with the
Triton versions that ship ptxas and cuobjdump in their wheel (3.6 on the GPU image, 3.8 here): only the
compiled kernel's text is read, never a driver.
"""

import collections
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
HOPPER_SMEM = 227 * 1024  # opt-in shared memory per block on H100/H200
# ld.global / st.global with their vector width and element type: ".v4.b32", ".b16", ...
_GLOBAL = r"{}\.global(?:\.[A-Za-z0-9:_]+)*?((?:\.v\d)?\.[bfsu]\d+)\s"
_LOADS, _STORES = re.compile(_GLOBAL.format("ld")), re.compile(_GLOBAL.format("st"))
# cp.async.{ca,cg}.shared.global [dst], [src], bytes: the pipeliner's global -> shared copies by size
_ASYNC_COPY = re.compile(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


@dataclasses.dataclass
class Facts:
    name: str
    registers: int  # per thread
    stack: int  # bytes of local memory per thread: > 0 means spilled registers
    shared: int  # bytes per CTA
    wgmma: bool  # warpgroup MMA (Hopper tensor cores) in the PTX
    tma: bool  # bulk tensor copies in the PTX
    loads: dict  # global loads in the PTX by width, e.g. {".v4.b32": 8, ".b32": 3}
    stores: dict
    fused_loop: bool  # an innermost loop that loads (async), multiplies and stores: a flattened persistent loop
    num_warps: int
    async_copies: dict = dataclasses.field(default_factory=dict)  # cp.async by bytes per copy, e.g. {16: 10}

    def bytes16_scalar_loads(self) -> int:
        """Scalar global loads of 16-bit data (a bf16 element per instruction)."""
        return sum(n for width, n in self.loads.items() if width in (".b16", ".u16", ".s16", ".f16"))

    def vector_loads(self, width: str = ".v4.b32") -> int:
        return self.loads.get(width, 0)

    def line(self) -> str:
        return (
            f"{self.name:32s} regs={self.registers:3d} stack={self.stack} smem={self.shared:6d} "
            f"wgmma={self.wgmma!s:5s} ld={dict(sorted(self.loads.items()))} st={dict(sorted(self.stores.items()))}"
            + (" fused-loop" if self.fused_loop else "")
        )


def _innermost_loops(ttgir: str) -> list[str]:
    """Bodies of the scf.for loops that hold no other loop (TTGIR nests regions by indentation)."""
    lines, open_loops, bodies = ttgir.splitlines(), [], []
    for i, line in enumerate(lines):
        text = line.lstrip()
        indent = len(line) - len(text)
        if " scf.for " in f" {text}" and text.rstrip().endswith("{"):
            open_loops.append((indent, i))
        elif text.startswith("}") and open_loops and open_loops[-1][0] == indent:
            _, start = open_loops.pop()
            body = "\n".join(lines[start + 1 : i])
            if "scf.for" not in body:
                bodies.append(body)
    return bodies


def has_fused_loop(ttgir: str) -> bool:
    """Whether one innermost loop issues global->shared copies, matrix products and global stores:
    the tile loop and the K loop flattened, so a tile's epilogue overlaps the next tile's loads."""
    return any(
        "copy_global_to_local" in body and ("warp_group_dot" in body or "tt.dot" in body) and "tt.store" in body
        for body in _innermost_loops(ttgir)
    )


def compile_sm90(src, options: dict, name: str) -> Facts:
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs_line = next(line.strip() for line in usage.splitlines() if "REG:" in line)
    ptx = compiled.asm["ptx"]
    return Facts(
        name=name,
        registers=int(regs_line.split("REG:")[1].split()[0]),
        stack=int(regs_line.split("STACK:")[1].split()[0]),
        shared=compiled.metadata.shared,
        wgmma="wgmma" in ptx,
        tma="cp.async.bulk.tensor" in ptx,
        loads=dict(collections.Counter(_LOADS.findall(ptx))),
        stores=dict(collections.Counter(_STORES.findall(ptx))),
        fused_loop=has_fused_loop(compiled.asm["ttgir"]),
        num_warps=options.get("num_warps", 4),
        async_copies=dict(collections.Counter(int(n, 0) for n in _ASYNC_COPY.findall(ptx))),
    )


def occupancy_problems(facts: Facts, ctas: int) -> list[str]:
    """`ctas` CTAs per SM must fit by registers and by shared memory."""
    from gptoss_kernels.gemm_configs import SM90_SHARED, register_ceiling

    ceiling = register_ceiling(ctas, facts.num_warps)
    problems = []
    if facts.registers > ceiling:
        problems.append(f"{facts.registers} registers > {ceiling} ({ctas} CTA(s) of {facts.num_warps} warps per SM)")
    if ctas * (facts.shared + 1024) > SM90_SHARED:
        problems.append(f"{facts.shared} B of shared memory leave no room for {ctas} CTAs per SM")
    return problems


def basic_problems(facts: Facts, *, needs_wgmma: bool) -> list[str]:
    return [
        msg
        for bad, msg in (
            (facts.shared > HOPPER_SMEM, "shared memory over Hopper's limit"),
            (facts.stack > 0, f"register spills ({facts.stack} B of stack)"),
            (needs_wgmma and not facts.wgmma, "no wgmma"),
        )
        if bad
    ]
