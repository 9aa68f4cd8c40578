"""The errors visionflow reports to a user as one clear line (the CLI exits 2 on them)."""


class VisionflowError(Exception):
    """Base of every expected failure: bad parameters, bad data, a failed stage.

    The message is complete on its own: the CLI prints it as one line without a traceback.
    """


class DataError(VisionflowError):
    """The data source cannot be used (missing, empty, too few classes, unsafe archive, offline download)."""


class ImageDecodeError(DataError):
    """One image cannot be used; names the file and the reason (used for quarantine)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # pickled whole: an error raised in the training process reaches the pipeline's
        return type(self), (self.path, self.reason)


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than allowed (read from its header, before decoding)."""


class TrainingError(VisionflowError):
    """Training stopped on a problem the user must fix (non-finite loss, bad device request)."""


class PackagingError(VisionflowError):
    """The model cannot be packaged as it is (e.g. the ONNX export does not match PyTorch)."""


class CheckpointError(VisionflowError):
    """A file given as a checkpoint is not a visionflow checkpoint (missing, not a PyTorch file, refused by
    the safe loader, or without the model spec, classes and weights visionflow writes)."""


class StageError(VisionflowError):
    """A pipeline stage failed; names the stage."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage} failed: {message}")
        self.stage = stage
        self.message = message

    def __reduce__(self):
        return type(self), (self.stage, self.message)
