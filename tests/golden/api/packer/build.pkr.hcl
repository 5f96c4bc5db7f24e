build {
  sources = [
    "source.qemu.api",
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
      "spec_hash" = "580eb9a0b139e853d0b07351ed0ba213350e1c6d34977e26d370550786c75928",
      "consul"    = "2.0.0",
      "envoy"     = "1.37.0",
      "meshbake"  = "0.1.0",
    }
  }
}
