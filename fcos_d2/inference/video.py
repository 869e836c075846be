"""Video files and cameras through OpenCV: frames in, annotated frames out."""

from collections.abc import Iterator
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from ..checks import ConfigError


class VideoSource:
    """Frames (H, W, 3) uint8 BGR of a video file or a camera (an int: its index)."""

    def __init__(self, source: Union[str, Path, int]):
        self.source = source
        self._capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
        if not self._capture.isOpened():
            if isinstance(source, int):
                raise ConfigError(f"--webcam: no camera could be opened at index {source}")
            what = "does not exist" if not Path(source).exists() else "is not a readable video"
            raise ConfigError(f"--video-input: {source} {what}")
        # Some files and cameras report 0 frames per second: write their frames at 30.
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or 30.0
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frame_count = count if count > 0 else None

    def frames(self) -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = self._capture.read()
                if not ok:
                    return
                yield frame
        finally:
            self._capture.release()


class VideoSink:
    """An MP4 file (MPEG-4 part 2, which OpenCV writes without extra codecs) of BGR frames."""

    def __init__(self, path: Union[str, Path], fps: float, width: int, height: int):
        path = Path(path)
        if path.suffix.lower() not in (".mp4", ".avi", ".mkv"):
            raise ConfigError(f"--output for a video must be a .mp4, .avi or .mkv file, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer = cv2.VideoWriter(
            str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
        )
        if not self._writer.isOpened():
            raise ConfigError(f"--output: cannot write a video to {path}")

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def close(self) -> None:
        self._writer.release()
