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
      "spec_hash" = "16cba2966b8110f8b9f174eccc39bec2ff65903a9fff1a74db32712e3136c751",
      "consul"    = "2.0.0",
      "envoy"     = "1.37.0",
      "meshbake"  = "0.1.0",
    }
  }
}
