"""What a client outside tlbuild needs to give tlbuild's answers: image-input models and the
conformance kit (made by the clients stage), and `tlbuild verify-client`, which checks one."""
