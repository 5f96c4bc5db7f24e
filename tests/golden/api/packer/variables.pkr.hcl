variable "base_image" {
  type        = string
  default     = ""
  description = "Path or URL of the base qcow2 (qemu)."
}


variable "base_checksum" {
  type        = string
  default     = "none"
  description = "Checksum of the base qcow2, e.g. sha256:..."
}


variable "output_directory" {
  type        = string
  default     = "output"
  description = "Where Packer writes the qcow2; must not exist."
}


variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "qemu accelerator: kvm where it really works, else tcg."
}


variable "cpu_model" {
  type        = string
  default     = "max"
  description = "qemu -cpu: host with kvm, max with tcg."
}


variable "ssh_private_key_file" {
  type        = string
  default     = ""
  description = "Ephemeral key of the build user (qemu)."
}


variable "manifest" {
  type        = string
  default     = "packer-manifest.json"
  description = "Where the manifest post-processor writes."
}


variable "serial_log" {
  type        = string
  default     = "serial.log"
  description = "The build VM's serial console log (qemu)."
}


variable "efi_vars" {
  type        = string
  default     = ""
  description = "The build VM's own copy of its UEFI variables (qemu)."
}


locals {
  stamp = formatdate("YYYYMMDD-hhmmss", timestamp())
}
