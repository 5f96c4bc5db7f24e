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
      "spec_hash" = "dc77c20dad401e91656efb2bd83c4eb557df0e8d51fd929b45a0028bb5e7f273",
      "consul"    = "2.1.0",
      "envoy"     = "1.38.3",
      "meshbake"  = "0.1.0",
    }
  }
}
