"""PyTorch's view of a CUDA device's peaks, to check jaxllm's calibration against on the same machine.

Usage (on a machine with torch and a GPU): python3 scripts/torch_peaks.py > torch_peaks.json
Prints one JSON object: bf16 8192³ matmul FLOP/s, f32 (TF32 off and on) 4096³/8192³ FLOP/s,
torch.sum over 1 GiB (read bytes/s) and a 1 GiB device copy (read + write bytes/s); each the best of
several timed repeats of back-to-back calls after a warm-up, timed with CUDA events.
"""

import json

import torch  # pyright: ignore[reportMissingImports]  (only on the GPU machine)


def best_seconds(fn, calls: int = 10, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return min(times)


def matmul(n: int, dtype: torch.dtype, tf32: bool) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda").to(dtype)
    return 2 * n**3 / best_seconds(lambda: a @ a)


def main() -> None:
    n = (1 << 30) // 4
    x = torch.ones(n, device="cuda")
    y = torch.empty_like(x)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bf16_flops_per_s": matmul(8192, torch.bfloat16, False),
        "tf32_flops_per_s": matmul(8192, torch.float32, True),
        "f32_flops_per_s": matmul(4096, torch.float32, False),
        "read_bytes_per_s": 4 * n / best_seconds(lambda: x.sum()),
        "copy_bytes_per_s": 8 * n / best_seconds(lambda: y.copy_(x)),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
