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
  

  provisioner "shell" {
    inline = [
      "sudo MESHBAKE_BUILDER=$PACKER_BUILDER_TYPE sh /tmp/meshbake/scripts/meshbake-bake",
    ]
  }
  

  post-processor "manifest" {
    output      = var.manifest
    strip_path  = true
    custom_data = {
      "spec_hash" = "20ca7fc6eba36e0e76236485745a74df313c5b672f0afb52b2fc22e5c5602bc8",
      "consul"    = "2.1.0",
      "envoy"     = "1.38.3",
      "meshbake"  = "0.1.0",
    }
  }
}
