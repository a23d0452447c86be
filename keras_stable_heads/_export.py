"""One decorator exports a public object: registered with Keras's serialization under this package's name.

So ``model.save()`` then ``keras.models.load_model()`` works with no ``custom_objects``.
"""

import keras

PACKAGE = "keras_stable_heads"


def export(obj):
    return keras.saving.register_keras_serializable(package=PACKAGE)(obj)
