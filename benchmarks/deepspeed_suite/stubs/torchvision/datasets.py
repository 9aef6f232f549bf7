"""FakeData: image i is drawn from a generator seeded with i + random_offset (as torchvision's is)."""
import torch


class FakeData(torch.utils.data.Dataset):

    def __init__(self, size=1000, image_size=(3, 224, 224), num_classes=10, transform=None, target_transform=None,
                 random_offset=0):
        self.size, self.image_size, self.num_classes = size, tuple(image_size), num_classes
        self.transform, self.target_transform, self.random_offset = transform, target_transform, random_offset

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index + self.random_offset)
        image = torch.rand(self.image_size, generator=generator)  # what ToTensor makes of an image: [0, 1]
        target = int(torch.randint(0, self.num_classes, (1, ), generator=generator))
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
