"""The local arm64 path with the real tools, without booting anything: Packer 1.6.6
validates the rendered arm64 qemu source, and the arm64 base's disk layout (GPT, the
EFI system partition made with mkfs.vfat at an offset and filled with mtools) is what
UEFI firmware boots."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder import proc
from builder.bake import base
from builder.bake.gates import gate_packer_validate
from builder.render.context import render_context
from builder.spec.model import Arch, load_spec
from builder.tools.packer import Packer
from tests.paths import REPO

pytestmark = pytest.mark.integration

#: sfdisk's GUIDs: the EFI system partition and a Linux file system.
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def test_packer_validates_the_arm64_qemu_source(tmp_path: Path) -> None:
    loaded = load_spec(REPO / "images" / "api.yaml")
    ctx = render_context(loaded, tmp_path / "ctx", packer=Packer())
    work = tmp_path / "work"
    work.mkdir()
    gate = gate_packer_validate(ctx, loaded, Packer(), work)
    assert gate.ok, gate.detail
    assert "qemu.api-arm64" in gate.detail
    # And alone, as the build runs it, with the firmware vars it is given.
    key = work / "key"
    proc.ssh_keygen(key, "validate")
    done = proc.run(
        [
            "packer", "validate", "-only", "qemu.api-arm64",
            "-var", f"base_image={work / 'base.qcow2'}",
            "-var", f"ssh_private_key_file={key}",
            "-var", f"efi_vars={work / 'vars.fd'}",
            ".",
        ],
        cwd=ctx.packer_dir,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_packer_refuses_an_unknown_qemu_option_so_the_check_above_can_fail(
    tmp_path: Path,
) -> None:
    loaded = load_spec(REPO / "images" / "api.yaml")
    ctx = render_context(loaded, tmp_path / "ctx", packer=Packer())
    sources = ctx.packer_dir / "sources.pkr.hcl"
    sources.write_text(
        sources.read_text().replace(
            'machine_type     = "virt"', 'machine_type     = "virt"\n  efi_firmware_code = "x"'
        )
    )
    assert "efi_firmware_code" in sources.read_text()
    work = tmp_path / "work"
    work.mkdir()
    gate = gate_packer_validate(ctx, loaded, Packer(), work)
    assert not gate.ok
    assert "efi_firmware_code" in gate.detail


def test_the_arm64_disk_is_gpt_with_an_efi_system_partition_holding_grub(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "disk.raw"
    size = 4 * 1024**3
    with raw.open("wb") as handle:
        handle.truncate(size)
    disk = base._partition(raw, size, Arch.ARM64)
    table = json.loads(proc.run(["sfdisk", "--json", raw]).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    esp, root = table["partitions"]
    assert (esp["type"], root["type"]) == (ESP_GUID, LINUX_GUID)
    assert disk.esp == (esp["start"] * 512, esp["size"] * 512)
    assert (disk.root_offset, disk.root_size) == (root["start"] * 512, root["size"] * 512)
    # GPT keeps its backup header in the last 33 sectors: the root stops before it.
    assert disk.root_offset + disk.root_size <= size - 33 * 512

    binary = tmp_path / "BOOTAA64.EFI"
    binary.write_bytes(b"MZ not really grub")
    base._write_esp(raw, disk.esp, "1A2B3C4D", binary)
    image = f"{raw}@@{disk.esp[0]}"
    copied = tmp_path / "copied.efi"
    subprocess.run(
        ["mcopy", "-n", "-i", image, "::/EFI/BOOT/BOOTAA64.EFI", str(copied)], check=True
    )
    assert copied.read_bytes() == binary.read_bytes()
    label = subprocess.run(
        ["minfo", "-i", image, "::"], check=True, capture_output=True, text=True
    ).stdout
    # The serial fstab names the partition by (UUID=1A2B-3C4D), and FAT32.
    assert "serial number: 1A2B3C4D" in label, label
    assert 'disk type="FAT32   "' in label, label
    # Nothing outside the ESP was written: the root's first sector is still empty.
    with raw.open("rb") as handle:
        handle.seek(disk.root_offset)
        assert handle.read(4096) == bytes(4096)


def test_the_amd64_disk_is_still_one_bootable_mbr_partition(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    size = 4 * 1024**3
    with raw.open("wb") as handle:
        handle.truncate(size)
    disk = base._partition(raw, size, Arch.AMD64)
    table = json.loads(proc.run(["sfdisk", "--json", raw]).stdout)["partitiontable"]
    assert table["label"] == "dos"
    (root,) = table["partitions"]
    assert root["start"] == 2048 and root.get("bootable") is True
    assert disk.esp is None and disk.root_offset == 1024 * 1024
