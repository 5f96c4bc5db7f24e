source "qemu" "api" {
  iso_url              = var.base_image
  iso_checksum         = var.base_checksum
  disk_image           = true
  use_backing_file     = false
  format               = "qcow2"
  disk_size            = "4G"
  disk_interface       = "virtio"
  disk_compression     = true
  accelerator          = var.accelerator
  cpus                 = 2
  memory               = 1024
  headless             = true
  vnc_bind_address     = "127.0.0.1"
  output_directory     = var.output_directory
  vm_name              = "api.qcow2"
  cd_files             = [
    "${path.root}/../cloudinit/seed/user-data",
    "${path.root}/../cloudinit/seed/meta-data",
  ]
  cd_label             = "cidata"
  communicator         = "ssh"
  ssh_username         = "packer"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "20m"
  shutdown_command     = "sudo /bin/sh /run/meshbake-finalize"
  shutdown_timeout     = "10m"
  qemuargs             = [
    [
      "-netdev",
      "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22",
    ],
    [
      "-device",
      "virtio-net,netdev=user.0",
    ],
    [
      "-cpu",
      var.cpu_model,
    ],
    [
      "-serial",
      "file:${var.serial_log}",
    ],
  ]
}


source "qemu" "api-arm64" {
  qemu_binary          = "qemu-system-aarch64"
  machine_type         = "virt"
  iso_url              = var.base_image
  iso_checksum         = var.base_checksum
  disk_image           = true
  use_backing_file     = false
  format               = "qcow2"
  disk_size            = "4G"
  disk_interface       = "virtio"
  disk_compression     = true
  accelerator          = var.accelerator
  cpus                 = 2
  memory               = 1024
  headless             = true
  vnc_bind_address     = "127.0.0.1"
  output_directory     = var.output_directory
  vm_name              = "api-arm64.qcow2"
  cd_files             = [
    "${path.root}/../cloudinit/seed/user-data",
    "${path.root}/../cloudinit/seed/meta-data",
  ]
  cd_label             = "cidata"
  communicator         = "ssh"
  ssh_username         = "packer"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "20m"
  shutdown_command     = "sudo /bin/sh /run/meshbake-finalize"
  shutdown_timeout     = "10m"
  qemuargs             = [
    [
      "-netdev",
      "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22",
    ],
    [
      "-device",
      "virtio-net,netdev=user.0",
    ],
    [
      "-cpu",
      var.cpu_model,
    ],
    [
      "-serial",
      "file:${var.serial_log}",
    ],
    [
      "-machine",
      "virt,accel=${var.accelerator},pflash0=efi-code,pflash1=efi-vars",
    ],
    [
      "-blockdev",
      "node-name=efi-code,driver=file,filename=/usr/share/AAVMF/AAVMF_CODE.fd,read-only=on",
    ],
    [
      "-blockdev",
      "node-name=efi-vars,driver=file,filename=${var.efi_vars}",
    ],
  ]
}
