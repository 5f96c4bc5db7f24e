build {
  sources = [
    "source.qemu.api",
    "source.qemu.api-arm64",
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
      "spec_hash" = "771c368c095949d3e8cfc6c6b688351b3800bed81ad54f0557f02847adcfae0e",
      "consul"    = "2.0.0",
      "envoy"     = "1.37.0",
      "meshbake"  = "0.1.0",
    }
  }
}
