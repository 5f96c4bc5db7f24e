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
      "spec_hash" = "d12aaa841c846f6c9c8604d61352afd85567daec3419aca235dd30c900362a9d",
      "consul"    = "2.0.0",
      "envoy"     = "1.37.0",
      "meshbake"  = "0.1.0",
    }
  }
}
