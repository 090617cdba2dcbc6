"""The one device and precision rule."""

import pytest
import torch

from radregion.device import (
    augment_workers,
    autocast_dtype,
    cpu_has_native_bf16,
    grad_scaler,
    inference_precision,
    memory_format,
    precision_name,
    resolve_device,
)

CPU = torch.device("cpu")


def test_auto_on_cpu_is_bf16_only_where_the_cpu_computes_it():
    assert autocast_dtype(CPU, "auto") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype(CPU, "bf16") == torch.bfloat16  # asked for: given even where it is emulated
    assert autocast_dtype(CPU, "fp32") is None


def test_features_are_fp32_on_every_cpu():
    assert inference_precision(CPU) == "fp32"  # training's "auto" is bf16 where the CPU computes it; features not
    assert inference_precision(CPU, "bf16") == "bf16"  # asked for: given
    assert inference_precision(torch.device("cuda")) == "auto"  # a GPU keeps its bf16 or fp16
    assert precision_name(CPU, "fp32") == "fp32" and precision_name(CPU, "bf16") == "bf16"
    assert precision_name(CPU, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")


def test_bad_precisions_are_refused():
    with pytest.raises(ValueError, match="fp16 autocast is for GPUs"):
        autocast_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype(CPU, "half")


def test_device_resolution_and_layout():
    assert resolve_device("cpu") == CPU and resolve_device(CPU) is CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert memory_format(CPU) == torch.channels_last
    assert not grad_scaler(CPU).is_enabled()


def test_augmentation_workers_only_where_a_gpu_trains():
    import os

    assert augment_workers(CPU) == 0  # a CPU's cores train the network
    on_gpu = augment_workers(torch.device("cuda"))  # the rule needs no GPU to be asked about one
    assert on_gpu == min(8, os.cpu_count() - 1) and 0 <= on_gpu < os.cpu_count()  # one core left to train
