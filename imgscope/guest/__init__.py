"""Inside the guest disk: partition tables and LVM2 volumes, read through any image."""
