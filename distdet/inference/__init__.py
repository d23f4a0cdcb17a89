"""Using a trained model: the :class:`~.predictor.Detector` API, batch prediction over files
with renders (:mod:`.batch_predict`), and TorchScript/ONNX export (:mod:`.export`)."""
