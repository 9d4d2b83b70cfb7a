"""Benchmark: the device's two ceilings, measured: device-to-device copy bandwidth and the bf16 GEMM rate.

Every other GPU figure is read against these: permute's "of copy" against the copy, MFU against the GEMM rate
(distill_step.py measures it again in its own process). The GEMM runs on random data (zeros run faster on some GPUs);
the data-sheet peak is printed beside it.

    python tools/bench/device.py [--device cuda] [--gemm 8192] [--copy-gb 2] [--json out.json]
"""
import argparse

import torch

import benchlib

COLUMNS = [("ceiling", "ceiling", ""), ("measured", "measured", ".1f"), ("unit", "unit", ""),
           ("datasheet", "data sheet", "g"), ("of_datasheet", "of data sheet", ".0%")]
DATASHEET_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gemm", type=int, default=8192, help="n of the n x n x n bf16 GEMM")
    parser.add_argument("--copy-gb", type=float, default=2.0, help="bytes copied, in GB")
    parser.add_argument("--json", help="also write the result to this JSON file")
    a = parser.parse_args(argv)
    device = benchlib.parse_device(a.device)
    if device.type != "cuda":
        raise SystemExit("device.py measures a GPU: --device cuda")
    name = torch.cuda.get_device_name(device)
    copy = benchlib.measure_copy_gbps(device, int(a.copy_gb * 1e9))
    gemm = benchlib.measure_matmul_tflops(device, a.gemm)
    copy_sheet = next((v for k, v in DATASHEET_GBPS if k in name), None)
    gemm_sheet = benchlib.datasheet_tflops(device)
    rows = [dict(ceiling="device-to-device copy (read + write)", measured=copy, unit="GB/s", datasheet=copy_sheet,
                 of_datasheet=copy / copy_sheet if copy_sheet else None),
            dict(ceiling=f"bf16 GEMM {a.gemm}^3, random data", measured=gemm, unit="TFLOP/s", datasheet=gemm_sheet,
                 of_datasheet=gemm / gemm_sheet if gemm_sheet else None)]
    res = benchlib.result("device", f"device ceilings, {name}: median of 10 after 3 warm-up", device,
                          {"gemm": a.gemm, "copy_gb": a.copy_gb, "copy_gbps": copy, "gemm_tflops": gemm}, COLUMNS,
                          rows, ["MFU elsewhere in this file is taken against the measured GEMM rate"])
    benchlib.print_table(res)
    benchlib.write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
