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
      "spec_hash" = "aa73c14b3150aa22e429cb7f189ee3db25e198f9e44f89a35245be0bb4169b5d",
      "consul"    = "1.22.1",
      "envoy"     = "1.38.3",
      "meshbake"  = "0.1.0",
    }
  }
}
