"""What a compiled XLA:GPU program runs, read from its optimized HLO text
(`Compiled.as_text()`): its kernels by kind, the bytes each reads and writes, its FLOPs,
its collectives, and a roofline estimate of its time (`cliquejax.lower --compile`).

Plain text in, numbers out: no plugin or device is needed to read a program, so the
counting and the roofline are tested on hand-written HLO (tests/test_hlo.py).

The model, stated (benchmarks/README.md quotes it):
- A kernel is an instruction of the entry computation (and of the computations it calls,
  a loop body once) that launches work: a fusion, a custom call (cuDNN convolution, cuBLAS
  GEMM, ...), a copy, a collective, or another unfused op. Parameters, constants, tuples,
  bitcasts, get-tuple-element and the `-done` halves of asynchronous ops are not kernels.
- Bytes moved by a kernel: the sizes of its operands and of its result, as the optimized
  HLO gives them; a loop fusion (elementwise work, slices, broadcasts, concatenations: one
  element of each operand per output element at most) is charged at most its output's
  element count of each operand; other fusions (reductions) the whole operands. A cuDNN /
  cuBLAS workspace, the u8 element of the result tuple, is not counted. Caches are not
  modelled: every kernel reads and writes device memory.
- FLOPs: 2 x multiply-adds of each convolution and dot product (custom calls, and those
  inside fusions); elementwise work counts 0 (those kernels are memory-bound).
- Time of a kernel: max(FLOPs / peak FLOP/s of its input dtype, bytes / memory bandwidth)
  plus a fixed cost per kernel (`kernel_seconds`: launch and tail). A collective: its bytes
  x 2 (n - 1) / n over the interconnect's bandwidth (a ring all-reduce) plus its own fixed
  cost. Kernels run one after another, collectives not overlapped with compute.
"""

from __future__ import annotations

import collections
import json
import re

# Bytes per element of the HLO element types (pred is stored in a byte).
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1}
# HLO element type -> the dtype name of a target's `peak_flops`
PEAK_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float32"}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
NOT_KERNELS = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
    "opt-barrier", "partition-id", "replica-id", "add-dependency", "domain",
    "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
    "async-done", "async-update", "send-done", "recv-done", "call", "while", "conditional",
})
COLLECTIVES = frozenset({
    "all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter",
    "all-to-all", "collective-permute", "collective-permute-start", "ragged-all-to-all",
    "collective-broadcast"})
KINDS = ("convolutions", "gemms", "fusions", "copies", "collectives", "custom_calls",
         "other")


class Instruction:
    __slots__ = ("name", "shape", "opcode", "operands", "attributes", "root")

    def __init__(self, name, shape, opcode, operands, attributes, root):
        self.name, self.shape, self.opcode = name, shape, opcode
        self.operands, self.attributes, self.root = operands, attributes, root


def _matching(text: str, start: int) -> int:
    """Index just past the bracket closing the one at `start` (strings skipped)."""
    depth, index, pairs = 0, start, {"(": ")", "[": "]", "{": "}"}
    closers = set(pairs.values())
    while index < len(text):
        char = text[index]
        if char in pairs:
            depth += 1
        elif char in closers:
            depth -= 1
            if depth == 0:
                return index + 1
        elif char == '"':  # a string attribute may hold brackets
            index = text.find('"', index + 1)
            if index < 0:
                break
        index += 1
    return len(text)


_DEFINITION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?.*\{\s*$")


def parse_instruction(line: str) -> Instruction | None:
    """One instruction line of HLO text, or None for a line that is not one."""
    match = _DEFINITION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # a tuple shape
        end = _matching(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
        brace = rest.find("{")  # a layout, {3,2,1,0}, belongs to the shape
        if 0 <= brace < end:
            end = max(end, _matching(rest, brace))
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren <= 0:
        return None
    opcode = rest[:paren]
    close = _matching(rest, paren)
    operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
    return Instruction(match.group(2), shape, opcode, operands, rest[close:],
                       bool(match.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """(computation name -> its instructions, the entry computation's name)."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None:
            header = _HEADER.match(line) if stripped.endswith("{") else None
            if header and not stripped.startswith("HloModule"):
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        if stripped == "}":
            current = None
            continue
        instruction = parse_instruction(line)
        if instruction is not None:
            computations[current].append(instruction)
    return computations, entry


def shape_bytes(shape: str, skip_workspace: bool = False) -> float:
    """Bytes of an HLO shape (a tuple: its elements). `skip_workspace`: a custom call's
    tuple whose last element is a u8 scratch buffer counts without it."""
    shapes = _SHAPE.findall(shape)
    if skip_workspace and len(shapes) > 1 and shapes[-1][0] == "u8":
        shapes = shapes[:-1]
    return float(sum(DTYPE_BYTES[dtype] * _elements(dims) for dtype, dims in shapes))


def _elements(dims: str) -> int:
    count = 1
    for dim in filter(None, dims.split(",")):
        count *= int(dim)
    return count


def _dims(shape: str) -> list[int]:
    found = _SHAPE.search(shape)
    return [int(d) for d in filter(None, found.group(2).split(","))] if found else []


def _dtype(shape: str) -> str | None:
    found = _SHAPE.search(shape)
    return found.group(1) if found else None


def _attribute(attributes: str, name: str) -> str | None:
    match = re.search(rf"\b{name}=(\"[^\"]*\"|[^,\s]+)", attributes)
    return match.group(1).strip('"') if match else None


def _called(instruction: Instruction) -> list[str]:
    """The computations an instruction calls (fusion bodies, loop bodies, branches)."""
    names = []
    for key in ("calls", "body", "condition", "to_apply"):
        value = _attribute(instruction.attributes, key)
        if value:
            names.append(value.lstrip("%"))
    branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attributes)
    if branches:
        names += [b.strip().lstrip("%") for b in branches.group(1).split(",") if b.strip()]
    return names


def _conv_flops(role: str, operands: list[str], result: str,
                attributes: str) -> tuple[float, str | None]:
    """2 x multiply-adds of a convolution: per output element, the filter's elements over
    its output features (the window x the input features of a group). Which of operands
    and result are input, filter and output depends on the cuDNN call (forward, backward
    input, backward filter); `dim_labels` (lhs_rhs->out) names the filter's `o` dim."""
    if role == "BackwardInput":
        output, kernel, dtype_of = operands[0], operands[1], operands[0]
    elif role == "BackwardFilter":
        output, kernel, dtype_of = operands[1], result, operands[0]
    else:
        output, kernel, dtype_of = result, operands[1], operands[0]
    out_dims, kernel_dims = _dims(output), _dims(kernel)
    labels = re.search(r"dim_labels=[^_\s]+_([^-\s]+)->", attributes)
    if not out_dims or not kernel_dims or not labels or "o" not in labels.group(1):
        return 0.0, _dtype(dtype_of)
    features = kernel_dims[labels.group(1).index("o")]
    macs = _elements(",".join(map(str, out_dims))) * _elements(
        ",".join(map(str, kernel_dims))) / features
    return 2.0 * macs, _dtype(dtype_of)


def _dot_flops(instruction: Instruction, shapes: dict[str, str],
               contracting: list[int] | None = None) -> tuple[float, str | None]:
    lhs = shapes.get(instruction.operands[0], "") if instruction.operands else ""
    if contracting is None:
        found = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attributes)
        contracting = [int(d) for d in found.group(1).split(",") if d] if found else []
    dims = _dims(lhs)
    size = 1
    for d in contracting:
        size *= dims[d] if d < len(dims) else 1
    return 2.0 * _elements(",".join(map(str, _dims(instruction.shape)))) * size, _dtype(lhs)


def _gemm_flops(instruction: Instruction, shapes: dict[str, str]) -> tuple[float, str | None]:
    found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction.attributes)
    contracting = [int(d.strip('" ')) for d in found.group(1).split(",") if d.strip('" ')] \
        if found else []
    return _dot_flops(instruction, shapes, contracting)


def _inner_flops(name: str, computations: dict, seen=None) -> tuple[float, str | None]:
    """FLOPs of the dots and convolutions inside a fused computation (a Triton GEMM)."""
    seen = seen or set()
    if name in seen or name not in computations:
        return 0.0, None
    seen.add(name)
    shapes = {i.name: i.shape for i in computations[name]}
    flops, dtype = 0.0, None
    for inner in computations[name]:
        if inner.opcode == "dot":
            f, dtype = _dot_flops(inner, shapes)
            flops += f
        elif inner.opcode == "convolution":
            f, dtype = _conv_flops("Forward", [shapes.get(o, "") for o in inner.operands],
                                   inner.shape, inner.attributes)
            flops += f
        for called in _called(inner):
            f, d = _inner_flops(called, computations, seen)
            flops, dtype = flops + f, dtype or d
    return flops, dtype


def _inner_opcodes(instruction: Instruction, computations: dict) -> set[str]:
    """The opcodes of the computations a fusion calls, nested ones included."""
    found, pending, seen = set(), list(_called(instruction)), set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for inner in computations.get(name, []):
            found.add(inner.opcode)
            pending += _called(inner)
    return found


def classify(instruction: Instruction, computations: dict) -> str | None:
    """The kind of kernel an instruction launches (`KINDS`), or None for no kernel."""
    opcode = instruction.opcode
    if opcode in NOT_KERNELS:
        return None
    if opcode in COLLECTIVES:
        return "collectives"
    if opcode in ("copy", "copy-start"):
        return "copies"
    if opcode == "custom-call":
        target = _attribute(instruction.attributes, "custom_call_target") or ""
        if target.startswith("__cudnn$conv"):
            return "convolutions"
        if target.startswith("__cublas") or target.startswith("__cublasLt"):
            return "gemms"
        return "custom_calls"
    if opcode == "fusion":  # a fused convolution or dot (Triton, cuDNN) is one of those
        inner = _inner_opcodes(instruction, computations)
        if "convolution" in inner:
            return "convolutions"
        if "dot" in inner or "__triton_gemm" in instruction.attributes:
            return "gemms"
        return "fusions"
    if opcode == "convolution":  # unfused (an XLA:CPU or TPU program)
        return "convolutions"
    if opcode == "dot":
        return "gemms"
    if opcode in ("async-start",):
        return "collectives" if any(
            i.opcode in COLLECTIVES for c in _called(instruction)
            for i in computations.get(c, [])) else "other"
    return "other"


def kernels(text: str) -> list[dict]:
    """Every kernel a run of the program launches, in order: name, kind, opcode (and custom
    call target), bytes read + written, FLOPs and the dtype they are computed in. A loop
    body's kernels are listed once."""
    computations, entry = parse_module(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    found: list[dict] = []

    def walk(name: str, seen: frozenset):
        if name in seen:
            return
        body = computations.get(name, [])
        shapes = {i.name: i.shape for i in body}
        for instruction in body:
            if instruction.opcode in ("call", "while", "conditional"):
                for called in _called(instruction):
                    walk(called, seen | {name})
                continue
            kind = classify(instruction, computations)
            if kind is None:
                continue
            operands = [shapes.get(o, "") for o in instruction.operands]
            flops, dtype = 0.0, None
            target = _attribute(instruction.attributes, "custom_call_target")
            if kind == "convolutions" and target:
                role = ("BackwardInput" if "BackwardInput" in target else
                        "BackwardFilter" if "BackwardFilter" in target else "Forward")
                flops, dtype = _conv_flops(role, operands, instruction.shape,
                                           instruction.attributes)
            elif kind == "gemms" and target:
                flops, dtype = _gemm_flops(instruction, shapes)
            elif instruction.opcode == "convolution":
                flops, dtype = _conv_flops("Forward", operands, instruction.shape,
                                           instruction.attributes)
            elif instruction.opcode == "dot":
                flops, dtype = _dot_flops(instruction, shapes)
            elif instruction.opcode == "fusion":
                for called in _called(instruction):
                    f, d = _inner_flops(called, computations)
                    flops, dtype = flops + f, dtype or d
            result = shape_bytes(instruction.shape, skip_workspace=target is not None)
            reads = [shape_bytes(s) for s in operands]
            if instruction.opcode == "fusion" and "kind=kLoop" in instruction.attributes:
                # one element of each operand per output element, at most (the module
                # docstring): a slice of a large operand is charged the slice's size
                largest = max((_elements(dims) for _, dims in _SHAPE.findall(
                    instruction.shape)), default=0)
                reads = [min(read, largest * DTYPE_BYTES.get(_dtype(s) or "f32", 4))
                         for read, s in zip(reads, operands, strict=True)]
            moved = result + sum(reads)
            found.append({"name": instruction.name, "kind": kind,
                          "opcode": target or instruction.opcode, "bytes": moved,
                          "result_bytes": result, "flops": flops, "dtype": dtype})

    walk(entry, frozenset())
    return found


def summarize(kernel_list: list[dict]) -> dict:
    """Counts by kind, bytes moved, FLOPs, and the all-reduces (count, bytes)."""
    by_kind = collections.Counter({kind: 0 for kind in KINDS})
    for kernel in kernel_list:
        by_kind[kernel["kind"]] += 1
    reduces = [k for k in kernel_list if k["opcode"] in ("all-reduce", "all-reduce-start")]
    return {"kernels": len(kernel_list), "kernels_by_kind": dict(by_kind),
            "bytes_moved": sum(k["bytes"] for k in kernel_list),
            "kernel_flops": sum(k["flops"] for k in kernel_list),
            "all_reduces": len(reduces),
            "all_reduce_bytes": sum(k["result_bytes"] for k in reduces)}


def roofline(kernel_list: list[dict], target: dict, devices: int = 1) -> dict:
    """The roofline estimate of one run of the program on `target` (a `cliquejax.targets`
    description): per kernel max(FLOPs / peak, bytes / bandwidth) plus the target's fixed
    cost per kernel; collectives over the interconnect (module docstring). Seconds by
    part: compute-bound, memory-bound, fixed costs, collectives."""
    peak, bandwidth = target["peak_flops"], target["memory_bandwidth"]
    fixed = target["kernel_seconds"]
    parts = {"compute_seconds": 0.0, "memory_seconds": 0.0, "fixed_seconds": 0.0,
             "collective_seconds": 0.0}
    for kernel in kernel_list:
        if kernel["kind"] == "collectives":
            share = 2.0 * (devices - 1) / devices if devices > 1 else 0.0
            parts["collective_seconds"] += (kernel["result_bytes"] * share
                                            / target["interconnect_bandwidth"]
                                            + target["collective_seconds"])
            continue
        rate = peak.get(PEAK_DTYPE.get(kernel["dtype"], "float32"), peak["float32"])
        compute, memory = kernel["flops"] / rate, kernel["bytes"] / bandwidth
        parts["compute_seconds" if compute > memory else "memory_seconds"] += max(compute,
                                                                                  memory)
        parts["fixed_seconds"] += fixed
    return {"step_seconds": sum(parts.values()), **parts}


def to_json(value) -> str:
    return json.dumps(value, sort_keys=True)
