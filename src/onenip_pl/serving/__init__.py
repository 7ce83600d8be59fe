"""The inspection server: one image per HTTP request in, a decision out, batched across clients.

``requests`` turns an HTTP request into a decoded image and options (and refuses bad ones before they can
join a batch), ``api`` runs the detector on LitServe's dynamic batches, ``responses`` writes the answer.
"""
