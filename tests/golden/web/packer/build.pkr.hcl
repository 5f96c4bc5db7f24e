build {
  sources = [
    "source.qemu.web",
    "source.amazon-ebs.web",
  ]
  
  provisioner "shell" {
    inline = [
      "mkdir -p /tmp/meshbake",
    ]
  }
  

  provisioner "file" {
    source      = "${path.root}/../stage/"
    destination = "/tmp/meshbake"
  }
  

  provisioner "file" {
    only        = [
      "amazon-ebs.web",
    ]
    source      = "${path.root}/../artifacts/${source.name}/"
    destination = "/tmp/meshbake/artifacts"
  }
  

  provisioner "shell" {
    inline = [
      "sudo MESHBAKE_BUILDER=$PACKER_BUILDER_TYPE sh /tmp/meshbake/scripts/meshbake-bake",
    ]
  }
  

  post-processor "manifest" {
    output      = var.manifest
    strip_path  = true
    custom_data = {
      "spec_hash" = "71a352c80a92d8241d0831f65ea0fea89526f6e67ae31529c16ae6d13742c936",
      "consul"    = "2.1.0",
      "envoy"     = "1.38.3",
      "meshbake"  = "0.1.0",
    }
  }
}
