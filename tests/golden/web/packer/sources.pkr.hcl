source "qemu" "web" {
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
  vm_name              = "web.qcow2"
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


source "amazon-ebs" "web" {
  region          = "us-east-1"
  instance_type   = "t3.small"
  ami_name        = "web-71a352c80a92-${local.stamp}"
  ami_description = "Demo web service on the Consul service mesh"
  ssh_username    = "admin"
  encrypt_boot    = true
  ami_regions     = []
  ami_users       = []
  tags            = {
    "team"                = "platform",
    "Name"                = "web",
    "meshbake:image"      = "web",
    "meshbake:spec-hash"  = "71a352c80a92d8241d0831f65ea0fea89526f6e67ae31529c16ae6d13742c936",
    "meshbake:consul"     = "2.1.0",
    "meshbake:envoy"      = "1.38.3",
    "meshbake:version"    = "0.1.0",
    "meshbake:build-time" = "${local.stamp}",
  }
  snapshot_tags   = {
    "team"                = "platform",
    "Name"                = "web",
    "meshbake:image"      = "web",
    "meshbake:spec-hash"  = "71a352c80a92d8241d0831f65ea0fea89526f6e67ae31529c16ae6d13742c936",
    "meshbake:consul"     = "2.1.0",
    "meshbake:envoy"      = "1.38.3",
    "meshbake:version"    = "0.1.0",
    "meshbake:build-time" = "${local.stamp}",
  }
  run_tags        = {
    "Name" = "meshbake-build-web",
  }
  
  source_ami_filter {
    filters     = {
      "name"                = "debian-12-amd64-*",
      "architecture"        = "x86_64",
      "virtualization-type" = "hvm",
      "root-device-type"    = "ebs",
    }
    owners      = [
      "136693071363",
    ]
    most_recent = true
  }
  

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 8
    volume_type           = "gp3"
    throughput            = 125
    iops                  = 3000
    delete_on_termination = true
    encrypted             = true
  }
}
