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
      "spec_hash" = "e5ae066d843e5ab528203da1cc92fab6f2fd58ee20e5cc66738f5bdf7f625a6b",
      "consul"    = "2.0.0",
      "envoy"     = "1.37.0",
      "meshbake"  = "0.1.0",
    }
  }
}
