"Layer 5: one module per paper. A method never imports another method; nothing in the library imports a method."
